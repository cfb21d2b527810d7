"""MoS + DIFF + EMA on Llama-3-8B with the paper's four datasets (§4.1, Table 2).

    python -m mos_jax.train --config configs/paper_llama_diff.py --workdir runs/llama-diff

Same as configs/paper.py:llama-diff; see that file for the static baselines and the outputs.
"""

from mos_jax import recipes


def get_config():
  return recipes.paper_config('llama', 'diff')  # Every setting is the paper's (mos_jax/recipes.py).
