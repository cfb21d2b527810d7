"""MoS + COSSIM + EMA on Qwen1.5-0.5B with the paper's four datasets (§4.1, Table 2).

    python -m mos_jax.train --config configs/paper_qwen_cossim.py --workdir runs/qwen-cossim

Same as configs/paper.py:qwen-cossim; see that file for the static baselines and the outputs.
"""

from mos_jax import recipes


def get_config():
  return recipes.paper_config('qwen', 'cossim')  # Every setting is the paper's (mos_jax/recipes.py).
