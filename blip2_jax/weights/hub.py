"""Hugging Face Hub ids as model names: `blip2_jax.load("Salesforce/blip2-opt-2.7b")`.

`resolve(name)` returns a directory: `name` itself when it is one, else the snapshot of the Hub
model `namespace/name` in huggingface_hub's cache (`HF_HUB_CACHE`, default
`$HF_HOME/hub`), downloaded when missing unless `HF_HUB_OFFLINE=1`. Only what loading needs is
fetched (JSON, safetensors, tokenizer files; never pickled `.bin` weights). A model that is
neither a directory, nor cached, nor reachable is one line saying so and how to fix it.
"""
from __future__ import annotations

import os
import re

from blip2_jax.weights.safetensors_io import WeightsError

# What loading reads: config / index / tokenizer / processor JSON, safetensors, vocabularies.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def is_repo_id(name: str) -> bool:
    """`namespace/name` as the Hub spells ids (a bare name is taken as a local path)."""
    return bool(_REPO_ID.match(name)) and "--" not in name and ".." not in name and not name.endswith(".git")


def resolve(name: str, revision: str | None = None) -> str:
    """A model directory, or a Hub id -> its local snapshot directory (see the module docstring).
    Names that are neither are returned unchanged, for the loader to report."""
    name = os.fspath(name)
    if os.path.exists(name) or not is_repo_id(name):
        if revision is not None and os.path.isdir(name):
            raise WeightsError(f"{name}: revision={revision!r} applies to Hugging Face Hub ids, not directories")
        return name
    try:
        from huggingface_hub import constants, errors, snapshot_download
    except ImportError:
        raise WeightsError(f"{name}: no such directory, and reading Hugging Face Hub ids needs huggingface_hub "
                           "(pip install huggingface_hub)") from None
    rev = f" --revision {revision}" if revision else ""
    fix = (f"download it with `hf download {name}{rev}` where the Hub is reachable (HF_HUB_CACHE or HF_HOME "
           "choose the cache), or pass a model directory")
    try:
        return snapshot_download(name, revision=revision, allow_patterns=ALLOW_PATTERNS)
    except errors.GatedRepoError:
        raise WeightsError(f"{name}: the Hugging Face Hub model is gated: accept its terms on huggingface.co and "
                           "log in with `hf auth login`") from None
    except errors.RepositoryNotFoundError:
        raise WeightsError(f"{name}: no such directory, and no Hugging Face Hub model of that name (or it is "
                           "private: log in with `hf auth login`)") from None
    except errors.RevisionNotFoundError:
        raise WeightsError(f"{name}: revision {revision!r} not found on the Hugging Face Hub") from None
    except errors.LocalEntryNotFoundError as e:  # not cached (or cached in part) and not reachable
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        partial = "is only partly cached" if isinstance(e, errors.IncompleteSnapshotError) else "is not cached"
        raise WeightsError(f"{name}: no such directory, and the Hugging Face Hub model {partial} in "
                           f"{constants.HF_HUB_CACHE} nor reachable{offline}; {fix}") from None
    except (errors.HfHubHTTPError, OSError, ValueError) as e:
        raise WeightsError(f"{name}: cannot fetch the Hugging Face Hub model ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:200]}); {fix}") from None
