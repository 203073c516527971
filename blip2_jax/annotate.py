"""`python -m blip2_jax.annotate`: the same as `python -m blip2_jax.cli.annotate`."""
import sys

from blip2_jax.cli.annotate import main

if __name__ == "__main__":
    sys.exit(main())
