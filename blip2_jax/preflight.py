"""The trainer's up-front checks: everything a run needs, before any model is built.

`validate(config, workdir)` raises the first problem as a one-line `UserError` that names the
flag fixing it; `python -m blip2_jax.main` prints it and exits with code 2. Checked: positive
steps and intervals; a mesh that fits the devices; a batch that is positive, within
`config.max_batch_per_device` x devices (the input pipeline holds a local batch in host memory) and
divisible by accumulation steps x the mesh's batch axes and by the processes; the weights
`config.init` reads (stage 2: a stage-1 workdir with checkpoints; tower directories that are set
must exist, unset ones start random, with a warning); a known dataset, text processor and
tokenizers, a dataset that is built or has its manual_dir, not smaller than one batch; a workdir
that is (or can become) a writable directory.
"""
from __future__ import annotations

import os
import tempfile

from absl import logging


class UserError(ValueError):
    """A problem with the configuration or inputs, reported as one line."""


def validate(config, workdir: str) -> None:
    """Raises UserError for the first problem of `config` / `workdir`; creates nothing."""
    check_schedule(config)
    check_mesh_and_batch(config, positive_int(config.max_batch_per_device, "max_batch_per_device"))
    check_init_sources(config)
    check_quantization(config)
    check_workdir(workdir)
    check_input(config.input)


def positive_int(value, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{flag} must be a positive integer, got {value!r} (--config.{flag})")
    return value


def check_schedule(config) -> None:
    for field in ("total_steps", "log_every", "ckpt_every", "keep_ckpts", "grad_accum_steps"):
        positive_int(config[field], field)


def check_mesh_and_batch(config, max_batch_per_device: int) -> None:
    import jax

    from blip2_jax import sharding

    shape = tuple(config.mesh_shape)
    if len(shape) != 3 or any(isinstance(d, bool) or not isinstance(d, int) or (d < 1 and d != -1)
                              for d in shape):
        raise UserError(f"mesh_shape must be three positive sizes (data, fsdp, tensor), one of "
                        f"them may be -1; got {shape} (--config.mesh_shape)")
    try:
        mesh = sharding.make_mesh(shape)
    except ValueError as e:
        raise UserError(f"{e} (--config.mesh_shape)") from None
    batch = positive_int(config.input.batch_size, "input.batch_size")
    devices = jax.device_count()
    if batch > max_batch_per_device * devices:
        raise UserError(f"input.batch_size {batch} is over {max_batch_per_device} per device on "
                        f"{devices} device(s); lower --config.input.batch_size (or raise "
                        f"--config.max_batch_per_device)")
    accum, processes = int(config.grad_accum_steps), jax.process_count()
    data = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % (accum * data) or batch % processes:
        raise UserError(f"input.batch_size {batch} must be divisible by grad_accum_steps ({accum}) "
                        f"x the mesh's batch axes (data x fsdp = {data}) and by the {processes} "
                        f"process(es) (--config.input.batch_size)")


def check_quantization(config) -> None:
    """`model.quantize_frozen` is a known mode the backend can run (blip2_jax/quant.py)."""
    from blip2_jax import quant
    try:
        quant.check_backend(quant.check_mode(config.model.get("quantize_frozen", "none")))
    except ValueError as e:
        raise UserError(f"{e} (--config.model.quantize_frozen)") from None


def check_init_sources(config) -> None:
    """The weights `config.init` reads exist (the sources: weights/init.py)."""
    ic, source = config.init, config.init.source
    if config.model.from_dir and not is_dir(config.model.from_dir):
        raise UserError(f"model.from_dir {config.model.from_dir!r} is not a directory "
                        f"(--config.model.from_dir)")
    if source == "random":
        return
    if source == "hf":
        if not is_dir(ic.hf_dir):
            raise UserError(f"init.source='hf' needs a transformers BLIP-2 directory: set "
                            f"--config.init.hf_dir=DIR (got {ic.hf_dir!r})")
        return
    if source not in ("unimodal", "stage1"):
        raise UserError(f"unknown init.source {source!r}: random, hf, unimodal or stage1 "
                        f"(--config.init.source)")
    towers = [("vision_dir", "a BLIP-2 or CLIP directory")]
    if config.task == "lm" and not config.model.no_text:
        towers.append(("llm_dir", "an OPT or T5 directory"))
    tower_flags = " and ".join(f"--config.init.{f}=DIR ({what})" for f, what in towers)
    if source == "stage1" and not has_checkpoint(ic.stage1_workdir):
        got = f" ({ic.stage1_workdir!r} has none)" if ic.stage1_workdir else ""
        raise UserError(f"init.source='stage1' (stage 2) needs a stage-1 workdir with checkpoints{got}: "
                        f"set --config.init.stage1_workdir=DIR or another --config.init.source (hf, "
                        f"unimodal, random); the frozen towers load from {tower_flags}")
    for field, what in towers:
        if ic[field] and not is_dir(ic[field]):
            raise UserError(f"init.{field} {ic[field]!r} is not a directory: set --config.init.{field}=DIR ({what})")
        if not ic[field]:
            logging.warning("init.%s is not set: that frozen tower starts random (--config.init.%s=DIR, %s)",
                            field, field, what)
    if source == "unimodal" and ic.bert and ic.bert != "minilm-offline" and not is_dir(ic.bert):
        raise UserError(f"init.bert {ic.bert!r} is not a directory: set --config.init.bert=DIR (a BERT "
                        f"directory, 'minilm-offline', or '' for a random Q-Former)")


def check_input(cfg) -> None:
    """A known dataset, text processor and tokenizers; a dataset built (or buildable: its
    manual_dir) with at least one batch of examples."""
    from blip2_jax.data import builders
    from blip2_jax.data import text as text_lib

    try:
        cls, config_name = builders.builder_class(cfg.dataset)
    except ValueError as e:
        raise UserError(f"{e} (--config.input.dataset)") from None
    names = [c.name for c in (cls.BUILDER_CONFIGS or ())]
    if config_name is not None and config_name not in names:
        raise UserError(f"dataset {cls.name} has no config {config_name!r}; known: {names} "
                        f"(--config.input.dataset)")
    if cfg.text_processor not in text_lib.SPECS:
        raise UserError(f"unknown input.text_processor {cfg.text_processor!r}; known: "
                        f"{sorted(text_lib.SPECS)} (--config.input.text_processor)")
    _, uses_qformer, uses_llm = text_lib.SPECS[cfg.text_processor]
    for used, field in ((uses_qformer, "qformer_tokenizer"), (uses_llm, "llm_tokenizer")):
        spec = cfg[field] or ""
        if used and not (spec.endswith("-offline") or is_dir(spec)):
            raise UserError(f"input.{field} {spec!r} is neither an offline tokenizer name nor a "
                            f"directory: set --config.input.{field}=DIR")
    positive_int(cfg.image_size, "input.image_size")
    builder = builders.get_builder(cfg.dataset, cfg.data_dir)
    if builder.is_prepared():
        try:
            size = builder.info.splits[cfg.split].num_examples
        except (KeyError, ValueError) as e:
            raise UserError(f"{cfg.dataset} has no split {cfg.split!r} ({e}) (--config.input.split)") from None
        if cfg.train and size < cfg.batch_size:
            raise UserError(f"input.batch_size {cfg.batch_size} is larger than the {size} examples "
                            f"of {cfg.dataset} {cfg.split!r} (--config.input.batch_size)")
    elif not cfg.prepare:
        raise UserError(f"{cfg.dataset} is not built under {builder.data_dir} (set "
                        f"--config.input.prepare=True or --config.input.data_dir)")
    elif getattr(cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None) and not is_dir(cfg.manual_dir or ""):
        raise UserError(f"{cfg.dataset} is not built under {builder.data_dir} and needs its files: "
                        f"set --config.input.manual_dir=DIR (got {cfg.manual_dir!r}; the layout is "
                        f"in the {cls.__name__} builder's docstring) or --config.input.data_dir")


def check_workdir(workdir: str) -> None:
    """A writable directory, or a path whose nearest existing parent is one."""
    if "://" in workdir:
        return  # remote storage: the checkpointer reports its own errors
    path = existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == path else f"is inside {existing}, a file"
        raise UserError(f"workdir {workdir} {where}, not a directory (--workdir)")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"workdir {workdir} is not writable ({e.strerror}: {existing}) (--workdir)") from None


def is_dir(path: str) -> bool:
    """An existing local directory, or a remote path (checked when it is read)."""
    return bool(path) and ("://" in path or os.path.isdir(path))


def has_checkpoint(workdir: str) -> bool:
    """A training workdir with at least one checkpoint step (remote: assumed)."""
    if not workdir:
        return False
    if "://" in workdir:
        return True
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))
