"""`python -m blip2_jax.evaluate`: the same as `python -m blip2_jax.cli.evaluate`."""
from blip2_jax.cli.evaluate import run

if __name__ == "__main__":
    run()
