"""MoS + DIFF + EMA on Qwen1.5-0.5B with the paper's four datasets (§4.1, Table 2).

    python -m mos_jax.train --config configs/paper_qwen_diff.py --workdir runs/qwen-diff

Same as configs/paper.py:qwen-diff; see that file for the static baselines and the outputs.
"""

from mos_jax import recipes


def get_config():
  return recipes.paper_config('qwen', 'diff')  # Every setting is the paper's (mos_jax/recipes.py).
