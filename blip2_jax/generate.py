"""`python -m blip2_jax.generate`: the same as `python -m blip2_jax.cli.generate`."""
import sys

from blip2_jax.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
