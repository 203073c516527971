"""`python -m blip2_jax.retrieve`: the same as `python -m blip2_jax.cli.retrieve`."""
import sys

from blip2_jax.cli.retrieve import main

if __name__ == "__main__":
    sys.exit(main())
