"""`python -m blip2_jax.build_pairs`: the same as `python -m blip2_jax.cli.build_pairs`."""
import sys

from blip2_jax.cli.build_pairs import main

if __name__ == "__main__":
    sys.exit(main())
