"""`python -m blip2_jax.score`: the same as `python -m blip2_jax.cli.score`."""
import sys

from blip2_jax.cli.score import main

if __name__ == "__main__":
    sys.exit(main())
