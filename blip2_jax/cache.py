"""JAX's persistent compilation cache: a second process reuses the first one's compiled programs.

Directory: `BLIP2_JAX_COMPILATION_CACHE` (empty or "off": disabled), else
`$XDG_CACHE_HOME/blip2_jax/xla` (default `~/.cache/blip2_jax/xla`). Turned on by `blip2_jax.load`,
the command-line tools and the miniature; a directory already set in jax's config is kept.
"""
from __future__ import annotations

import os

ENV = "BLIP2_JAX_COMPILATION_CACHE"


def env_dir(env: str, name: str) -> str | None:
    """A cache directory: `$env` if set ("", "off", "0", "none": disabled -> None), else
    `$XDG_CACHE_HOME/blip2_jax/<name>` (default `~/.cache/blip2_jax/<name>`)."""
    value = os.environ.get(env)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "none") else os.path.expanduser(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "blip2_jax", name)


def default_dir() -> str | None:
    """The compilation cache directory from the environment (None: disabled)."""
    return env_dir(ENV, "xla")


def enable(directory: str | None = None, min_compile_seconds: float = 0.5) -> str | None:
    """Turns the persistent cache on (idempotent); returns the directory in use, or None."""
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    directory = directory or default_dir()
    if directory is None:
        return None
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return None  # read-only home: compile every time rather than fail
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    return directory
