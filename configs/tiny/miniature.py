"""The miniature pipeline's phases for the trainer's command line (settings live in
blip2_jax/miniature/config.py):

  python -m blip2_jax.main --config=configs/tiny/miniature.py:stage1,towers=W/towers --workdir=W/stage1
"""
from blip2_jax.miniature.config import get_config  # noqa: F401
