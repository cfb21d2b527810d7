"""Instance selection (paper §5, Table 4): the top fraction of each dataset by IFD, or at random.

    python -m mos_jax.data.select --config configs/paper.py:qwen-diff \
        --config.data.root=data/paper_full --method ifd --keep 0.1 --out data/paper_ifd

Scores every training example of the config's datasets with the config's model (IFD =
PPL(answer | instruction) / PPL(answer), two batched forwards on the config's mesh), drops those
with IFD >= --ifd_max (default 1, as Cherry LLM does), keeps the top `keep` of each dataset (all
that are left when fewer remain, with the count printed) and writes OUT/<name>/train.jsonl,
dev.jsonl (the config's dev set), scores.jsonl (each example's IFD and why it was dropped) and
OUT/manifest.json: the layout of `mos_jax.data.prepare`, so a recipe trains on it with
--config.data.root=OUT. `--method random` keeps a seeded random fraction (Table 4's RANDOM rows).
Running it again on the same OUT resumes the scoring.
"""

from absl import flags

from mos_jax.infra import cli

_CONFIG = cli.define_config_flag()
_METHOD = flags.DEFINE_enum('method', 'ifd', ['ifd', 'random'], 'Selection method.')
_KEEP = flags.DEFINE_float('keep', 0.1, 'Fraction of each dataset kept.')
_OUT = flags.DEFINE_string('out', None, 'Output folder (also holds the resumable score cache).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of --method random.')
_BATCH = flags.DEFINE_integer('batch_size', 0, 'Examples per scoring batch (0 = '
                              'data.eval_batch_size).')
_IFD_MAX = flags.DEFINE_float('ifd_max', 1.0, '--method ifd drops examples with IFD >= this '
                              'before taking the top fraction (Cherry LLM: 1, where the '
                              'instruction stops helping).')


def main(argv):
  del argv
  from mos_jax.data import ifd  # Imported after flag parsing: it pulls in jax.
  config = _CONFIG.value
  config.data.num_workers = 0  # Only finite in-order passes: no worker processes.
  ifd.select(config, _METHOD.value, _KEEP.value, _OUT.value, seed=_SEED.value,
                   batch_size=_BATCH.value, progress=config.train.progress_bar,
                   ifd_max=_IFD_MAX.value)


if __name__ == '__main__':
  cli.run(main, 'data.select', required=('config', 'out'))
