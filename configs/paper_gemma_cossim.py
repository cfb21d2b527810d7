"""MoS + COSSIM + EMA on Gemma-2B with the paper's four datasets (§4.1, Table 2).

    python -m mos_jax.train --config configs/paper_gemma_cossim.py --workdir runs/gemma-cossim

Same as configs/paper.py:gemma-cossim; see that file for the static baselines and the outputs.
"""

from mos_jax import recipes


def get_config():
  return recipes.paper_config('gemma', 'cossim')  # Every setting is the paper's (mos_jax/recipes.py).
