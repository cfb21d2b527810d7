"""The end-of-run summary: final mixture and dev loss per dataset, before -> after."""

from __future__ import annotations

from mos_jax.workdir import metrics as metrics_lib


def summarize(metrics_path: str, names) -> dict:
  """Reads metrics.jsonl: first and last dev loss and last probability of every dataset."""
  rows = metrics_lib.read_metrics(metrics_path)
  summary = {'steps': max((r['step'] for r in rows), default=0), 'datasets': {}}
  for name in names:
    evals = [r[f'eval/{name}/loss'] for r in rows if r.get(f'eval/{name}/loss') is not None]
    probs = [r[f'mixture/{name}'] for r in rows if r.get(f'mixture/{name}') is not None]
    summary['datasets'][name] = {
        'probability': probs[-1] if probs else None,
        'dev_loss_before': evals[0] if evals else None,
        'dev_loss_after': evals[-1] if evals else None,
    }
  return summary


def format_summary(summary: dict) -> str:
  fmt = lambda x: '-' if x is None else f'{x:.4f}'
  width = max([len('dataset')] + [len(n) for n in summary['datasets']])
  lines = [f'Finished {summary["steps"]} steps.',
           f'{"dataset":<{width}}  {"final p":>8}  {"dev loss before -> after":>26}']
  for name, d in summary['datasets'].items():
    change = f'{fmt(d["dev_loss_before"])} -> {fmt(d["dev_loss_after"])}'
    lines.append(f'{name:<{width}}  {fmt(d["probability"]):>8}  {change:>26}')
  return '\n'.join(lines)
