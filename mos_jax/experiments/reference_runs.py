"""Runs a comparison row reads before its own: DoReMi's reference model is the `uni` run of the same
data and seed (Xie et al. 2023 train the reference on the uniform mixture).

`run_order(strategies)` lists the strategies to run for each seed with every reference before the
rows that read it (a reference nobody asked for is trained, not reported); `overrides` gives the
`--config.KEY=VALUE` arguments that point a row at its reference's folder. A finished reference run
is reused (compare skips finished runs), so `uni` trains once per seed for both rows.
"""

from __future__ import annotations

from typing import Callable

# strategy -> (the strategy whose run of the same seed it reads, the config key naming that folder)
REFERENCES: dict[str, tuple[str, str]] = {
    'doremi': ('uni', 'mixing.doremi.reference'),
}


def run_order(strategies) -> list[str]:
  """`strategies` with each one's reference first (once)."""
  order = []
  for name in strategies:
    reference = REFERENCES.get(name)
    if reference and reference[0] not in order:
      order.append(reference[0])
    if name not in order:
      order.append(name)
  return order


def overrides(name: str, folder_of: Callable[[str], str]) -> list[str]:
  """The arguments pointing strategy `name` at its reference's run folder (`folder_of(strategy)`,
  the same seed's); none for a strategy without one."""
  if name not in REFERENCES:
    return []
  reference, key = REFERENCES[name]
  return [f'--config.{key}={folder_of(reference)}']


def describe() -> list[str]:
  """`--list` lines: which rows read which reference."""
  return [f'{name} reads --config.{key}=WORKDIR/{ref}/seed<k> (the {ref} run of its seed, trained '
          f'first)' for name, (ref, key) in REFERENCES.items()]
