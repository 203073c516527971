"""`python -m blip2_jax.miniature`: see pipeline.py (the phases) and runner.py (their order)."""
from blip2_jax.miniature.runner import main

if __name__ == "__main__":  # not in the second lane's process, which imports this module
    main()
