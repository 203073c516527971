"""Orbax checkpointing of the trainable state, the step and the data-iterator state.

Frozen weights are never saved: they come from their source (a transformers directory, the
unimodal checkpoints, or random init with a fixed seed) every time the trainer starts.
Saves are asynchronous; `keep` checkpoints are kept; a save is atomic (orbax writes to a
temporary directory and renames), so a crash mid-save leaves the previous checkpoints intact.
"""
from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with items "state" (pytree) and "data" (JSON)."""

    def __init__(self, directory: str, *, keep: int = 3, save_every: int = 1000, async_save: bool = True):
        self.manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, save_interval_steps=save_every, create=True,
                enable_async_checkpointing=async_save),
            item_names=("state", "data"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: Any = None, *, force: bool = False) -> bool:
        """Saves when the interval says so (or `force`); returns whether a save started."""
        args = {"state": ocp.args.StandardSave(state)}
        args["data"] = ocp.args.JsonSave(_jsonable(data_state))
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def due(self, step: int) -> bool:
        """Whether the interval saves at `step`."""
        return bool(self.manager.should_save(step))

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, Any]:
        """Restores into the shardings of `abstract_state` (a pytree of ShapeDtypeStruct with
        `.sharding`), so a checkpoint written on one mesh restores on another."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError("no checkpoint to restore")
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return step, out["state"], _unjsonable(out["data"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing `tree`, for restoring into it."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _jsonable(data_state: Any) -> Any:
    # Iterator states may be bytes (grain) or dicts; JSON needs text.
    if isinstance(data_state, bytes):
        return {"__bytes__": data_state.decode("latin-1")}
    return {"value": data_state} if not isinstance(data_state, dict) else data_state


def _unjsonable(d: Any) -> Any:
    if isinstance(d, dict) and "__bytes__" in d:
        return d["__bytes__"].encode("latin-1")
    if isinstance(d, dict) and set(d) == {"value"}:
        return d["value"]
    return d
