"""The paper's main runs (§4.1, Table 2): MoS + EMA on MathInstruct, MedInstruct, ShareGPT and P3.

    python -m mos_jax.train --config configs/paper.py:llama-cossim --workdir runs/llama-cossim

Variants `<model>-<reward>`: model qwen (Qwen1.5-0.5B), gemma (Gemma-2B), llama (Llama-3-8B),
and the newer families with the same hyper-parameters: qwen3 (Qwen3-8B), gemma3 (Gemma-3-4B,
its text model), mistral (Mistral-7B-v0.3); reward cossim or diff. Static baselines of Table 2 on the same data and model:

    --config.mixing.strategy=static --config.mixing.prior_temperature=1    # PROP. (tau = 1)
    --config.mixing.strategy=static --config.mixing.prior_temperature=10   # TEMP. (tau = 10)
    --config.mixing.strategy=static --config.mixing.prior_temperature=inf  # UNI. (tau = inf)

Produces in the workdir: metrics.jsonl, tb/, mixture.png (cf. Figure 2), loss.png (cf. Figure 3),
checkpoints/, config.json. Needs the local model folder named in mos_jax/config/recipes.py and
the data written by `python -m mos_jax.data.prepare paper --out data/paper` (or --config.data.root=DIR);
trains 3 epochs over it (train.epochs).
"""

from mos_jax.config import recipes

VARIANTS = recipes.variants()  # The `:arg` suffixes this file accepts (tests load each one).


def get_config(arg: str = 'qwen-cossim'):
  return recipes.paper_config_from_arg(arg)
