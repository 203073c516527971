"""Every `python -m` entry point but the trainer (`blip2_jax.main`), the memory planner
(`blip2_jax.plan`) and the miniature (`blip2_jax.miniature`):

  generate  captions, answers, instructed generation      score     log-likelihood of candidates
  match     ITM probability and ITC similarity            retrieve  text -> image over a folder
  evaluate  the paper's evaluation protocols

`python -m blip2_jax.<name>` is the same as `python -m blip2_jax.cli.<name>`. Bad input ends with
one line on stderr and exit status 2 (common.py).
"""
