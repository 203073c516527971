r"""The trainer: stage 1, stage 2 and fine-tuning of BLIP-2 on a device mesh.

  python -m blip2_jax.main --config=configs/stage2_opt.py --workdir=/tmp/run \
      [--config.total_steps=1000 ...]

`train()` reads top to bottom: config -> checks (preflight.py: one-line errors, nothing built
yet) -> mesh -> model & params (frozen / trainable) ->
optimizer -> input -> compiled step -> resume -> loop (log, evaluate, checkpoint, SIGTERM,
non-finite guard).
"""
from __future__ import annotations

import os
import signal
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from blip2_jax.preflight import UserError, validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go (local or gs://).")


class TrainingHalted(RuntimeError):
    """The run stopped on purpose (e.g. a non-finite loss); the last good checkpoint is kept."""


def train(config, workdir: str) -> dict:
    """Runs training to `config.total_steps`; returns the last logged metrics."""
    import jax

    from blip2_jax import sharding

    maybe_initialize_distributed(config)
    # ---------------------------------------------------------------- checks (nothing built yet)
    validate(config, workdir)
    # ---------------------------------------------------------------- mesh
    mesh = sharding.make_mesh(tuple(config.mesh_shape))
    logging.info("mesh %s on %d process(es)", dict(mesh.shape), jax.process_count())
    # Activations are pinned by the logical-axis rules wherever the model is traced below.
    with sharding.use(mesh):
        return _train(config, workdir, mesh)


def _train(config, workdir: str, mesh) -> dict:
    import jax

    from blip2_jax import checkpoint as ckpt_lib
    from blip2_jax import metric_writer
    from blip2_jax.data import pipeline
    from blip2_jax.evaluators import registry as evaluators

    # ---------------------------------------------------------------- model, params, optimizer
    model, model_cfg, task, state, frozen, schedule = create_state(config, mesh)
    _write_config(config, workdir)

    # ---------------------------------------------------------------- input
    train_iter = pipeline.make_iterator(config.input)
    keys = task.batch_keys

    # ---------------------------------------------------------------- compiled step
    step_fn = jax.jit(make_train_step(task, schedule, int(config.grad_accum_steps)),
                      donate_argnums=(0,))

    # ---------------------------------------------------------------- resume
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(config.keep_ckpts),
                                 save_every=int(config.ckpt_every),
                                 async_save=bool(config.async_checkpointing))
    start = 0
    if ckpt.latest_step() is not None:
        start, state, data_state = ckpt.restore(ckpt_lib.abstract_like(state))
        data_state = _own_data_state(data_state)
        if data_state is not None:
            train_iter.set_state(data_state)
        logging.info("resumed from step %d", start)
    writer = metric_writer.MetricWriter(workdir)
    evals = evaluators.from_config(config.evals, model=model, model_cfg=model_cfg, mesh=mesh,
                                   llm_tokenizer=config.input.llm_tokenizer,
                                   qformer_tokenizer=config.input.qformer_tokenizer)

    stop = {"signal": None}
    # With several processes jax's preemption service owns SIGTERM and picks one step at which
    # every process stops (`_preempted`); a Python handler would replace its handler.
    own_sigterm = jax.process_count() == 1
    if own_sigterm:
        previous = signal.signal(signal.SIGTERM, lambda s, f: stop.__setitem__("signal", s))
    rng0 = jax.random.key(int(config.seed))
    total, log_every = int(config.total_steps), int(config.log_every)
    flops, peak, compiled = None, peak_flops_per_device(config), False
    last, t_log, steps_since, step = {}, time.time(), 0, start
    # A step's loss is read after the next step is queued: reading it at once would make the
    # host wait for each step before loading the next batch.
    pending = None
    try:
        for step in range(start, total):
            local = next(train_iter)
            batch = pipeline.make_global_batch({k: local[k] for k in keys}, mesh)
            rng = jax.random.fold_in(rng0, step)
            if not compiled:
                step_fn.lower(state, frozen, batch, rng).compile()  # the calls below reuse it
                compiled = True
                flops = _step_flops(config, batch) if config.get("log_mfu", True) else None
                wait_for_all_processes("blip2_compiled", int(config.distributed.initialization_timeout_s))
            state, metrics = step_fn(state, frozen, batch, rng)
            steps_since += 1
            if pending is not None:  # the previous step's loss, read once this one is queued
                _check_finite(*pending, ckpt)
            done = step + 1
            pending = (done, metrics)
            stopping = stop["signal"] is not None or _preempted(done)
            logged = done % log_every == 0 or done == total
            if logged or stopping or evals.due(done) or ckpt.due(done):
                _check_finite(*pending, ckpt)  # never logged, evaluated or saved unchecked
                pending = None
            if logged:
                dt = (time.time() - t_log) / steps_since
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                last.update(_throughput(config, dt, flops, peak, total - done))
                writer.write(done, last)
                logging.info("step %d/%d %s", done, total,
                             " ".join(f"{k}={v:.4g}" for k, v in sorted(last.items())))
                t_log, steps_since = time.time(), 0
            for name, value in evals.run_due(done, state.params, frozen):
                writer.write(done, {name: value})
                last[name] = value
            ckpt.save(done, state, _data_state(train_iter, ckpt, done, done == total), force=done == total)
            if stopping:
                if ckpt.latest_step() != done:  # orbax itself saves at a preemption sync point
                    ckpt.save(done, state, _data_state(train_iter, ckpt, done, True), force=True)
                logging.warning("stopping on signal at step %d after a final save", done)
                break
    finally:
        ckpt.close()
        writer.close()
        train_iter.close()  # stops grain's worker processes, if any
        if own_sigterm:
            signal.signal(signal.SIGTERM, previous)
    return last


def create_state(config, mesh):
    """Model, task, sharded TrainState (trainable params + optimizer) and frozen params."""
    import jax

    from blip2_jax import optim, tasks, train_state
    from blip2_jax.models import build
    from blip2_jax.weights import init as init_lib

    model, model_cfg = build.build_model(config.model)
    task = tasks.get(config.task, model, config)
    params = init_lib.init_params(model, model_cfg, config, mesh, frozen_cast=True)  # sharded jax.Arrays
    trainable, frozen = train_state.split_and_cast(params, config)
    del params
    logging.info("parameters: trainable %.2fM, frozen %.2fM", _count(trainable) / 1e6, _count(frozen) / 1e6)
    tx, schedule = optim.make_optimizer(config.optim, trainable), optim.make_schedule(config.optim)
    state = jax.jit(lambda p: train_state.TrainState.create(p, tx),
                    out_shardings=state_shardings(tx, trainable, mesh))(trainable)
    return model, model_cfg, task, state, frozen, schedule


def state_shardings(tx, trainable, mesh):
    """Shardings of `TrainState.create(trainable, tx)`: optimizer moments split like their
    parameters, counters replicated. (Left to jit, the moments come out replicated, and the
    first step then returns another layout, which recompiles the step.)"""
    import jax
    import optax

    from blip2_jax import sharding, train_state

    abstract = jax.eval_shape(lambda p: train_state.TrainState.create(p, tx), trainable)
    params = jax.tree.map(lambda x: x.sharding, trainable)
    rep = sharding.replicated(mesh)
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, params,
                                transform_non_params=lambda _: rep)
    return abstract.replace(step=rep, params=params, opt_state=opt)


def make_train_step(task, schedule, accum: int = 1):
    """train_step(state, frozen, batch, rng) -> (state, metrics): gradients w.r.t. the trainable
    params only; `accum` micro-batches are accumulated into one optimizer update."""
    import jax
    import jax.numpy as jnp
    import optax

    from blip2_jax import train_state

    def train_step(state, frozen, batch, rng):
        def loss_of(p, mb, r):
            return task.loss(train_state.merge_params(p, frozen), mb, r)

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)
        if accum == 1:
            (loss, aux), grads = grad_fn(state.params, batch, rng)
        else:
            micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

            def body(carry, xs):
                mb, i = xs
                (l, a), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (g, l, a)), None

            shapes = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro), rng)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[1], shapes[0][0], shapes[0][1]))
            (grads, loss, aux), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
            grads, loss, aux = jax.tree.map(lambda x: x / accum, (grads, loss, aux))
        new_state = state.apply_gradients(grads)
        metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
        return new_state, metrics

    return train_step


def _write_config(config, workdir: str) -> None:
    """WORKDIR/config.json: what evaluation and stage-2 initialisation read back."""
    import jax
    from etils import epath  # local paths and gs:// (through gcsfs) alike
    if jax.process_index() == 0:
        path = epath.Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(config.to_json_best_effort(indent=2))


def _check_finite(step: int, metrics: dict, ckpt) -> None:
    """Halts training on a non-finite loss at `step` (its state is never saved)."""
    import numpy as np

    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise TrainingHalted(f"non-finite loss {loss} at step {step}; the last good checkpoint "
                             f"(step {ckpt.latest_step()}) is kept")


def _data_state(train_iter, ckpt, step: int, force: bool):
    """The data-iterator state to checkpoint at `step`. Orbax writes JSON items from process 0
    only, but every process reads its own shard: with several processes, all their states are
    gathered (when a save is due) as {"per_process": [state of process 0, 1, ...]}."""
    import json

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return train_iter.get_state()
    if not (force or ckpt.manager.should_save(step)):
        return None
    raw = np.frombuffer(json.dumps(train_iter.get_state()).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([raw.size]))[:, 0]
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    every = multihost_utils.process_allgather(padded)
    return {"per_process": [json.loads(every[i, :n].tobytes()) for i, n in enumerate(sizes)]}


def _own_data_state(data_state):
    """This process's part of a restored data state (see `_data_state`); None when the
    checkpoint was written by a different number of processes (the input then restarts)."""
    import jax
    if not (isinstance(data_state, dict) and "per_process" in data_state):
        return data_state if jax.process_count() == 1 else None
    states = data_state["per_process"]
    if len(states) != jax.process_count():
        logging.warning("the data state was saved by %d processes, not %d: the input pipeline "
                        "starts afresh", len(states), jax.process_count())
        return None
    return states[jax.process_index()]


def maybe_initialize_distributed(config) -> None:
    """Multi-host start-up: on TPU pods (or when a coordinator address is configured)."""
    import jax
    dist = config.distributed
    timeout = int(dist.initialization_timeout_s) if dist else 600
    if dist and dist.get("coordinator_address"):
        if not jax.distributed.is_initialized():
            jax.distributed.initialize(dist.coordinator_address, int(dist.num_processes), int(dist.process_id),
                                       initialization_timeout=timeout)
    elif os.environ.get("TPU_WORKER_HOSTNAMES") and not jax.distributed.is_initialized():
        jax.distributed.initialize(initialization_timeout=timeout)
    if jax.process_count() > 1:
        # Orbax's barriers through the coordination service (with timeouts) rather than
        # collectives: a CPU (gloo) collective fails when peers arrive over 30 s apart.
        import orbax.checkpoint  # noqa: F401  (defines the barrier flag set below)
        try:
            flags.FLAGS.experimental_orbax_use_distributed_barrier = True
        except (AttributeError, flags.Error):
            logging.warning("orbax has no distributed-barrier flag; its barriers use collectives")


def wait_for_all_processes(name: str, timeout_s: int) -> None:
    """A coordination-service barrier (no collectives): lines the processes up before the first
    step, so slow compilation on one host does not time out the others' first collective."""
    import jax
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost
    multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


# bf16 dense matmul peak per chip, for MFU (override with config.peak_flops).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12,
              "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12,
              "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


def peak_flops_per_device(config) -> float | None:
    import jax
    if config.peak_flops:
        return float(config.peak_flops)
    kind = jax.devices()[0].device_kind
    for name, value in PEAK_FLOPS.items():
        if kind.startswith(name):
            return value
    return None


def _preempted(step: int) -> bool:
    """All processes agree on a preemption (SIGTERM to any of them) at the same step."""
    import jax
    if jax.process_count() == 1:
        return False
    from jax.experimental import multihost_utils
    try:
        return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # the preemption service is not running
        return False


def _count(tree) -> int:
    import jax
    return sum(x.size for x in jax.tree.leaves(tree))


def abstract_train_state(config, mesh=None):
    """(task, schedule, state, frozen) as `create_state` makes them, but ShapeDtypeStructs:
    nothing is allocated. With `mesh`, each carries the sharding the trainer gives it."""
    import jax

    from blip2_jax import optim, quant, sharding, tasks, train_state
    from blip2_jax.models import build

    def with_shardings(tree, shardings):
        return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)

    model, model_cfg = build.build_model(config.model)
    task = tasks.get(config.task, model, config)
    boxed = build.abstract_params(model, model_cfg)
    params = sharding.unbox(boxed)
    if mesh is not None:
        params = with_shardings(params, sharding.param_shardings(boxed, mesh))
    trainable, frozen = train_state.split_params(params, list(config.frozen_patterns))
    cast = jax.eval_shape(lambda p: train_state.split_and_cast(p, config)[1], params)
    if mesh is not None:
        frozen_sh = quant.quantized_shardings(jax.tree.map(lambda x: x.sharding, frozen), frozen,
                                              config.model.get("quantize_frozen", "none"))
        cast = with_shardings(cast, frozen_sh)
    tx, schedule = optim.make_optimizer(config.optim, trainable), optim.make_schedule(config.optim)
    state = jax.eval_shape(lambda p: train_state.TrainState.create(p, tx), trainable)
    if mesh is not None:
        state = with_shardings(state, state_shardings(tx, trainable, mesh))
    return task, schedule, state, cast


def unrolled_step_flops(config, batch) -> float:
    """FLOPs of one train step over the whole `batch` (arrays or ShapeDtypeStructs): XLA's
    cost analysis of the step traced with unrolled layers and no accumulation loop (it counts a
    loop body once, so a scanned stack would count as one layer). Traced only: nothing is
    allocated or compiled."""
    import jax

    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.model.scan_layers, c.grad_accum_steps = False, 1
    task, schedule, state, frozen = abstract_train_state(c)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    lowered = jax.jit(make_train_step(task, schedule)).lower(
        state, frozen, {k: jax.ShapeDtypeStruct(batch[k].shape, batch[k].dtype) for k in task.batch_keys}, rng)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def _step_flops(config, batch) -> float | None:
    """FLOPs per device of one step, for MFU (None where cost analysis is unavailable)."""
    import jax
    try:
        return unrolled_step_flops(config, batch) / jax.device_count() or None
    except Exception as e:
        logging.warning("no FLOP count for MFU: %s", e)
        return None


def _throughput(config, step_time: float, flops, peak, steps_left: int) -> dict:
    import jax
    out = {"step_time_s": step_time, "images_per_s": config.input.batch_size / step_time,
           "eta_min": steps_left * step_time / 60}
    if flops:
        per_device = flops / step_time / 1e12
        out["tflops_per_device"] = per_device
        if peak:
            out["mfu"] = per_device * 1e12 / peak
    del jax
    return out


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    workdir = _WORKDIR.value
    if not workdir:
        print("error: --workdir is required", file=sys.stderr)
        sys.exit(2)
    from blip2_jax.data.builders.base import DatasetError
    try:
        train(_CONFIG.value, workdir)
    except (UserError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingHalted as e:
        print(f"halted: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
