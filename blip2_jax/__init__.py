"""BLIP-2 in JAX/Flax (arXiv 2301.12597).

`blip2_jax.load(dir)` returns a `Blip2Inference` (see `blip2_jax.inference`); it is imported on
first use so that `import blip2_jax` stays cheap (no jax, no transformers).
"""


def load(directory, **kwargs):
    """A transformers-format BLIP-2 directory or Hugging Face Hub id ("Salesforce/blip2-opt-2.7b")
    -> `blip2_jax.inference.Blip2Inference`.

    kwargs: dtype ("float32" | "bfloat16"), mesh (a `sharding.make_mesh` mesh, or "cores": every
    core of a CPU host, see `blip2_jax.cores`), length_bucket,
    scan_layers (None: `serving.default_scan_layers`, which on CPU scans an OPT language model
    and unrolls the rest), revision (a Hub branch, tag or commit),
    quantize ("int8" | "int4": the frozen towers' matrices quantized, see `blip2_jax.quant`).
    """
    from blip2_jax.inference import load as _load

    return _load(directory, **kwargs)


__all__ = ["load"]
