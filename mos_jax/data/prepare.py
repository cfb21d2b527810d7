"""Builds the paper's training data (§4.1, Table 1) reproducibly.

    python -m mos_jax.data.prepare paper --out data/paper [--seed 0] \
        [--source general=/data/ShareGPT_V3_unfiltered_cleaned_split.json] --source nlp=/data/P3

Writes OUT/<name>/train.jsonl (a seeded random 10% of each dataset; P3: of 1K random examples per
subset), OUT/<name>/dev.jsonl (1K examples outside the training sample), OUT/<name>/test.jsonl
(1K more, none equal to a train or dev example; only compare's verdict reads it) and
OUT/manifest.json,
and prints the counts next to Table 1's. The same arguments reproduce the files byte for byte.
"""

from absl import flags

from mos_jax.infra import cli
from mos_jax.data import paper_sets

_OUT = flags.DEFINE_string('out', None, 'Output folder.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of every draw.')
_SOURCE = flags.DEFINE_multi_string(
    'source', [], 'name=PATH: a local copy of a dataset (math, medicine, general, nlp) instead '
    'of its hub id; P3 (nlp) needs one: a folder with one sub-folder per subset.')
_FRACTION = flags.DEFINE_float('fraction', 0.1, 'Share of each dataset kept for training.')
_DEV = flags.DEFINE_integer('dev', 1000, 'Dev examples per dataset, drawn outside the training set.')
_TEST = flags.DEFINE_integer('test', None, 'Test examples per dataset, drawn outside train and '
                            'dev (default: as many as --dev).')
_PER_TASK = flags.DEFINE_integer('p3_per_task', 1000, 'P3 examples drawn per subset first.')
_DATASETS = flags.DEFINE_list('datasets', list(paper_sets.PAPER), 'Datasets to prepare.')


def _sources(specs) -> dict[str, str]:
  out = {}
  for spec in specs:
    name, sep, path = spec.partition('=')
    if not sep or not name or not path:
      raise ValueError(f'--source {spec!r}: expected name=PATH')
    out[name] = path
  return out


def main(argv):
  if argv[1:] != ['paper']:
    raise ValueError('usage: python -m mos_jax.data.prepare paper --out DIR [--seed S] '
                         '[--source name=PATH ...]')
  manifest = paper_sets.prepare_paper(
      _OUT.value, seed=_SEED.value, local_sources=_sources(_SOURCE.value),
      fraction=_FRACTION.value, dev=_DEV.value, per_task=_PER_TASK.value, names=_DATASETS.value,
      test=_TEST.value)
  print(paper_sets.table(manifest))


if __name__ == '__main__':
  cli.run(main, 'data.prepare', required=('out',))
