"""Shared pieces of the command-line tools (`python -m blip2_jax.generate|score|match|retrieve`).

Bad user input (a missing or unreadable image, a directory that is not a model, a prompt that
is too long, an invalid option) ends the program with exit code 2 and one line on stderr,
`<tool>: error: <what is wrong>`, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

DTYPES = ("float32", "bfloat16")


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse itself prints the whole usage first)."""

    def error(self, message: str):
        fail(self.prog, message)


def fail(prog: str, message: str):
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def parser(prog: str, description: str, cores: bool = True) -> OneLineParser:
    p = OneLineParser(prog=prog, description=description)
    p.add_argument("--model", required=True, metavar="DIR_OR_ID",
                   help="transformers-format BLIP-2 directory, or Hugging Face Hub id (e.g. "
                        "Salesforce/blip2-opt-2.7b: its cache, downloaded unless HF_HUB_OFFLINE=1)")
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit (with a Hub id)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="frozen towers' dtype")
    add_quantize(p)
    if cores:
        add_cores(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def add_quantize(p: argparse.ArgumentParser) -> None:
    """--quantize: the frozen towers' matrices in int8 / int4 (blip2_jax/quant.py)."""
    p.add_argument("--quantize", default=None, metavar="MODE",
                   help="frozen towers' matrices quantized: int8 or int4 (weight-only, one scale per "
                        "output channel); default: as the checkpoint stores them")


def add_cores(p: argparse.ArgumentParser) -> None:
    """--cores: on a CPU host, one device per core, decoding split over them (blip2_jax/cores.py)."""
    p.add_argument("--cores", type=positive_int, default=None, metavar="N",
                   help="on a CPU host: serve on N cores, one device each (default: every core this "
                        "process may use; 1: one device)")


def _number(kind, lower, strict: bool):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if value < lower or (strict and value == lower):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {lower}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


positive_int = _number(int, 1, strict=False)
nonnegative_int = _number(int, 0, strict=False)
positive_float = _number(float, 0.0, strict=True)


def run(prog: str, main: Callable[[], Any]) -> int:
    """Runs `main()`; user-input errors become one line on stderr and exit code 2."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # no C++ log lines from XLA
    from blip2_jax.preprocess import InputError
    from blip2_jax.weights.safetensors_io import WeightsError
    try:
        main()
    except (InputError, WeightsError, ValueError, FileNotFoundError, IsADirectoryError) as e:
        fail(prog, str(e) or type(e).__name__)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def load_images(paths: Sequence[str]):
    """Reads every image first, so a bad file is reported before the model is loaded."""
    from blip2_jax.preprocess import load_image
    return [load_image(p) for p in paths]


def load_model(args):
    from blip2_jax import cores
    from blip2_jax.inference import load
    return load(args.model, dtype=args.dtype, revision=getattr(args, "revision", None),
                quantize=getattr(args, "quantize", None), mesh=cores.mesh(getattr(args, "cores", None)))


def print_json(obj: Any):
    print(json.dumps(obj, indent=1, ensure_ascii=False))
