"""Files a user hands us, treated as untrusted: regular files only, bounded JSON, paths kept
inside their root.

Every reader of a model directory (config and processor JSON, safetensors shards, images) opens
files through `open_regular`, so a FIFO or a device is refused before `open` could block, and
names taken from a file (an index's shard names) go through `inside`, so they cannot leave the
directory. (Files with fixed names, such as config.json, may be links the user made.) Errors are one line, raised as the caller's error class (`WeightsError`, `InputError`).
"""
from __future__ import annotations

import json
import os
import stat
from typing import IO, Any

JSON_MAX_BYTES = 64 * 2**20  # config / index / processor files are kilobytes; a released index ~100 KB


def open_regular(path: str, error: type[Exception] = ValueError, what: str = "file") -> IO[bytes]:
    """Opens `path` for binary reading if it is a regular file (symlinks followed). A FIFO, device
    or socket is refused from `os.stat` without being opened; the check is repeated on the
    descriptor (opened non-blocking), so a file swapped in between cannot hang us either."""
    try:
        _require_regular(os.stat(path).st_mode, path, error, what)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as e:
        raise error(f"cannot open {what} {path}: {e.strerror or e}") from None
    try:
        _require_regular(os.fstat(fd).st_mode, path, error, what)
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _require_regular(mode: int, path: str, error: type[Exception], what: str) -> None:
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file")
        raise error(f"{what} {path} is {kind}, not a regular file")


def read_json(path: str, error: type[Exception] = ValueError, what: str = "JSON file",
              max_bytes: int = JSON_MAX_BYTES) -> Any:
    """A regular file of at most `max_bytes` of UTF-8 JSON -> its value; every failure is one line."""
    with open_regular(path, error, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise error(f"{path}: {what} of {size} bytes is larger than the {max_bytes}-byte limit")
        raw = f.read(max_bytes + 1)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path}: {what} is not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise error(f"{path}: {what} is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and integers too long to convert
        raise error(f"{path}: {what} is not valid JSON: {' '.join(str(e).split())}") from None


def read_json_object(path: str, error: type[Exception] = ValueError, what: str = "JSON file") -> dict:
    """`read_json` that must give a JSON object."""
    value = read_json(path, error, what)
    if not isinstance(value, dict):
        raise error(f"{path}: {what} must be a JSON object, not {json_type(value)}")
    return value


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (for messages)."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def model_root(directory: str) -> str:
    """The folder a model directory's files must resolve into: the directory itself, or for a
    Hugging Face cache snapshot (`models--org--name/snapshots/<rev>`, files symlinked to
    `../../blobs/`) the repository's cache folder."""
    real = os.path.realpath(directory)
    snapshots, repo = os.path.dirname(real), os.path.dirname(os.path.dirname(real))
    if (os.path.basename(snapshots) == "snapshots" and os.path.basename(repo).startswith("models--")
            and os.path.isdir(os.path.join(repo, "blobs"))):
        return repo
    return real


def inside(directory: str, name: Any, error: type[Exception] = ValueError, what: str = "file") -> str:
    """`directory/name` for a relative `name` read from an untrusted file: no absolute path, no
    `..`, and the resolved path (symlinks followed) inside `model_root(directory)`."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise error(f"{directory}: invalid {what} name {name!r}")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts:
        raise error(f"{directory}: {what} {name!r} points outside the model directory")
    path = os.path.join(directory, os.path.normpath(name))
    root = model_root(directory)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise error(f"{directory}: {what} {name!r} is a link leading outside the model directory")
    return path
