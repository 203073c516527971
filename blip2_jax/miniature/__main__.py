"""`python -m blip2_jax.miniature`: see pipeline.py."""
from blip2_jax.miniature.pipeline import main

main()
