"""`python -m blip2_jax.capfilt`: the same as `python -m blip2_jax.cli.capfilt`."""
import sys

from blip2_jax.cli.capfilt import main

if __name__ == "__main__":
    sys.exit(main())
