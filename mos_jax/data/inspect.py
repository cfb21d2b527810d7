"""Loads and tokenizes every dataset of a config and reports what training would see.

    python -m mos_jax.data.inspect --config configs/demo.py [--config.data.max_len=64]

Per dataset: examples, tokens, mean prompt/response length, truncated and dropped counts, the
fraction of batch positions that hold real tokens (not padding) with the run's packing/buckets
settings, training examples per packed row (what a batch of rows holds), and one rendered example whose trained tokens (the loss mask) are shown between ⟦ and ⟧. Run it before
spending accelerator hours; bad data fails here with the file and line.
"""

import numpy as np
from absl import flags

from mos_jax.config import check as config_check
from mos_jax.data import bundle as bundle_lib
from mos_jax.infra import cli

_COLUMNS = (('train_examples', 'train'), ('dev_examples', 'dev'), ('test_examples', 'test'),
            ('tokens', 'tokens'),
            ('mean_prompt_len', 'prompt'), ('mean_response_len', 'response'),
            ('truncated', 'truncated'), ('dropped_too_long', 'too long'),
            ('dropped_no_target', 'no target'), ('skipped_records', 'bad records'))


def show_mask(tokenizer, ids, trained) -> str:
  """The example's text with each run of trained tokens between ⟦ and ⟧."""
  out, inside = [], False
  for token, flag in zip(ids, trained):
    if flag and not inside:
      out.append('⟦')
    elif not flag and inside:
      out.append('⟧')
    inside = bool(flag)
    out.append(tokenizer.decode([int(token)]))
  if inside:
    out.append('⟧')
  return ''.join(out)


def real_token_fractions(bundle, batches: int = 8) -> dict[str, float]:
  """Per dataset, the share of training-batch positions that hold real tokens, over `batches`
  batches drawn from it alone (uses up the bundle's loader: call it on a bundle that will not train)."""
  out = {}
  for i, name in enumerate(bundle.names):
    bundle.train.set_probabilities(np.eye(len(bundle.names))[i])
    got = [next(bundle.train)['segment_ids'] for _ in range(batches)]
    out[name] = float(sum((g > 0).sum() for g in got) / sum(g.size for g in got))
  return out


def examples_per_row(bundle) -> dict[str, float]:
  """Per dataset, training examples per row of one pass (1 unpacked; more when packed): what a
  batch of rows holds in examples."""
  rows = bundle.train.rows_per_epoch()
  return {name: bundle.sizes[i] / rows[i] for i, name in enumerate(bundle.names)}


def report(bundle, fractions: dict[str, float] | None = None,
           per_row: dict[str, float] | None = None) -> str:
  """The table (with 'real tok %' / 'ex/row' columns when `fractions` / `per_row` are given) and
  one example per dataset."""
  fractions, per_row = fractions or {}, per_row or {}
  extra = ('real tok %'.rjust(12) if fractions else '') + ('ex/row'.rjust(8) if per_row else '')
  lines = ['dataset'.ljust(12) + ' format'.ljust(17) + ''.join(h.rjust(12) for _, h in _COLUMNS)
           + extra]
  for name in bundle.names:
    s = bundle.stats[name]
    lines.append(name.ljust(12) + ' ' + s['format'].ljust(16)
                 + ''.join(str(s[k]).rjust(12) for k, _ in _COLUMNS)
                 + (f'{100 * fractions[name]:.1f}'.rjust(12) if name in fractions else '')
                 + (f'{per_row[name]:.2f}'.rjust(8) if name in per_row else ''))
  for name in bundle.names:
    ex = bundle.example(name, 0)
    lines += ['', f'--- {name}: train example 0 ({len(ex["ids"])} tokens; ⟦trained⟧) ---',
              show_mask(bundle.tokenizer, ex['ids'], ex['trained'])]
  return '\n'.join(lines)


def main(argv):
  del argv
  config = flags.FLAGS.config
  config_check.validate(config)
  config.data.num_workers = 0  # Nothing is iterated here: no worker processes.
  bundle = bundle_lib.build_data(config)
  per_row = examples_per_row(bundle)
  fractions = real_token_fractions(bundle)
  print(report(bundle, fractions, per_row))
  bundle.close()


if __name__ == '__main__':
  # Defined here, not at import, so importing `report` never clashes with a program's flags.
  cli.define_config_flag()
  cli.run(main, 'data.inspect')
