"""MoSpec (§5.5): Llama-3-8B specialised in mathematics, learning from all four datasets.

    python -m mos_jax.train --config configs/mospec_math.py:cossim --workdir runs/mospec-cossim
    python -m mos_jax.train --config configs/mospec_math.py:diff --workdir runs/mospec-diff

COSSIM rewards each dataset by its similarity to Mathematics (itself included); DIFF doubles the
Mathematics reward. Otherwise the settings of §4.1 (mos_jax/config/recipes.py), on the data written by
`python -m mos_jax.data.prepare paper --out data/paper` (or --config.data.root=DIR), 3 epochs.
Produces the usual run folder; mixture.png should show 'math' gaining probability.
"""

from mos_jax.config import recipes

VARIANTS = ('cossim', 'diff')  # The `:arg` suffixes this file accepts (tests load each one).


def get_config(arg: str = 'cossim'):
  if arg not in VARIANTS:
    raise ValueError(f'Unknown MoSpec reward {arg!r}; choose cossim or diff.')
  c = recipes.paper_config('llama', arg, strategy='mospec', target='math')
  c.mixing.target_factor = 2.0  # §5.5: "we double the reward for the Mathematics dataset".
  return c
