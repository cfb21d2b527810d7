"""MoS + COSSIM + EMA on Llama-3-8B with the paper's four datasets (§4.1, Table 2).

    python -m mos_jax.train --config configs/paper_llama_cossim.py --workdir runs/llama-cossim

Same as configs/paper.py:llama-cossim; see that file for the static baselines and the outputs.
"""

from mos_jax import recipes


def get_config():
  return recipes.paper_config('llama', 'cossim')  # Every setting is the paper's (mos_jax/recipes.py).
