"""`python -m blip2_jax.demo`: the same as `python -m blip2_jax.cli.demo`."""
import sys

from blip2_jax.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
