"""A dataset's train, dev and test splits: which examples each holds, disjoint by content.

Dev is carved from the training file seeded by the dataset name only (the same across runs and
seeds); a test split carved from it too has its own seed, so adding one leaves dev as it was.
"""

from __future__ import annotations

import hashlib
import json
import zlib

import numpy as np


def split_dev(name: str, n: int, dev: int):
  if dev < 0 or dev >= n:
    raise ValueError(f'dataset {name!r}: dev_examples={dev} leaves no training examples out of {n}')
  # Seeded by the dataset name only: the dev set stays the same across runs and seeds.
  perm = np.random.default_rng(zlib.crc32(name.encode())).permutation(n)
  return np.sort(perm[dev:]), np.sort(perm[:dev])


def example_hash(conv) -> str:
  """Identity of one example by content: two records that convert to the same conversation
  are the same example, whatever file or line they came from."""
  return hashlib.sha1(json.dumps(conv, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def split_test(name: str, hashes: list[str], train_idx, dev_hashes: set, test: int):
  """`test` distinct examples out of train_idx, none equal to a dev example; every copy of
  them leaves the train split too (files repeat records: the demo does). -> train, test, copies."""
  # Its own seed (dataset name and 'test'): adding a test split leaves the dev split as it was.
  rng = np.random.default_rng([zlib.crc32(name.encode()), zlib.crc32(b'test')])
  chosen, seen = [], set()
  for i in rng.permutation(np.asarray(train_idx)):
    if len(chosen) == test:
      break
    if hashes[i] not in dev_hashes and hashes[i] not in seen:
      chosen.append(int(i))
      seen.add(hashes[i])
  if len(chosen) < test:
    raise ValueError(f'dataset {name!r}: test_examples={test} but only {len(chosen)} distinct '
                     f'training examples differ from the dev split')
  train = np.asarray([i for i in train_idx if hashes[i] not in seen], np.int64)
  if not len(train):
    raise ValueError(f'dataset {name!r}: test_examples={test} leaves no training examples')
  return train, np.sort(chosen), len(train_idx) - len(train) - test


def check_disjoint(name: str, hashes: dict[str, list[str]], where: str):
  """Refuses a test split that shares an example (by content hash) with train or dev."""
  test = set(hashes['test'])
  for split in ('train', 'dev'):
    shared = test & set(hashes[split])
    if shared:
      raise ValueError(f'dataset {name!r}: {len(shared)} test examples ({where}) also appear in '
                       f'its {split} split; a test split must be held out of both')
