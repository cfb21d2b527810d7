"""The demo: a tiny model learns four generated skills while MoS (DIFF + EMA) learns the mixture.

  python -m mos_jax.train --config configs/demo.py --workdir runs/demo

Generates the demo skills and tokenizer into data.demo_dir on first use (nothing is downloaded),
trains the `tiny` preset from scratch for a few hundred steps on the CPU (a few minutes on two cores),
and writes metrics.jsonl, tb/, mixture.png, loss.png, config.json and checkpoints/ to the workdir.
The summary at the end shows every skill's dev loss falling and the learned mixture moving away from
uniform.
"""

from mos_jax import config as config_lib
from mos_jax.data import demo_skills


def get_config():
  c = config_lib.base_config()
  c.seed = 0  # Fixed so the demo is reproducible.

  c.model.preset = 'tiny'  # A few hundred thousand parameters, llama family.
  c.model.scan_layers = True  # Scanned layers (as every recipe).

  c.data.demo_dir = 'runs/demo_data'  # Skills and tokenizer are generated here if missing.
  c.data.tokenizer = 'runs/demo_data/tokenizer'  # The demo's byte-level tokenizer.
  c.data.max_len = 128  # Demo examples are short.
  c.data.packing = True  # Several short examples per row (segment ids keep them apart).
  c.data.reward_batch_size = 16  # Packed rows per skill for each reward (2 to 5 examples each).
  c.data.eval_batch_size = 32  # Dev batches of 32 packed rows.
  for name, entry in demo_skills.config_entries('runs/demo_data').items():
    c.data.datasets[name] = entry  # One entry per skill, sizes about 26 : 5 : 9 : 63.

  c.train.steps = 300  # Enough for every skill's dev loss to fall visibly.
  c.train.batch_size = 16  # Small batch for two CPU cores.
  c.train.lr = 3e-3  # A tiny model trained from scratch wants a large learning rate.
  c.train.weight_decay = 0.01  # Mild decay.
  c.train.log_every = 10  # A metrics line every 10 steps.
  c.train.eval_every = 50  # Dev loss per skill every 50 steps.
  c.train.eval_batches = 2  # 64 dev examples per skill per evaluation.
  c.train.checkpoint_every = 100  # Checkpoints at 100, 200, 300.

  c.mixing.strategy = 'mos'  # Learn the mixture.
  c.mixing.reward = 'diff'  # DIFF: perplexity now vs. at the start.
  c.mixing.ema = True  # Smooth rewards (Eq. 11).
  c.mixing.update_every = 20  # More scorer updates than the paper's 100, for a short run.
  c.mixing.scorer_lr = 1e-2  # Larger than the paper's 1e-4 so 15 updates visibly move p.
  c.mixing.inner_steps = 20  # Adam steps per scorer update.
  c.mixing.diff_reference = 'device'  # theta_0 stays on device (tiny model; no cache pass).
  return c
