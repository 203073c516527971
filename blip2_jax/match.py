"""`python -m blip2_jax.match`: the same as `python -m blip2_jax.cli.match`."""
import sys

from blip2_jax.cli.match import main

if __name__ == "__main__":
    sys.exit(main())
