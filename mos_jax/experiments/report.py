"""What `collect` writes for a comparison: results.md, results.csv, mixtures.png, convergence.png."""

from __future__ import annotations

import csv
import math

from mos_jax.experiments.verdict import MIN_SEEDS

def rank_order(values: dict[str, float]) -> dict[str, int]:
  """1 for the lowest value, 2 for the second lowest (ties share), others 0."""
  order = sorted(set(values.values()))
  return {k: (order.index(v) + 1 if order.index(v) < 2 else 0) for k, v in values.items()}


def mark(text: str, rank: int) -> str:
  return f'**{text}**' if rank == 1 else f'<u>{text}</u>' if rank == 2 else text


def fmt(mean_se) -> str:
  return f'{mean_se[0]:.4f} ± {mean_se[1]:.4f}'


METHOD = ('Method: the best static and the best learned strategy are picked on mean dev loss; '
          'for each learned strategy, its per-seed mean test loss minus the best static\'s on '
          'the same seed gives a paired t-interval, Holm-Bonferroni corrected over the learned '
          'strategies so that together they hold with 95% confidence. A strategy beats or loses '
          'to the best static only when its corrected interval excludes 0, otherwise it ties, '
          f'and with fewer than {MIN_SEEDS} paired seeds no verdict is given.')


def write_md(path, table, names, missing, best_static, target, verdict_line, header, steps,
              task_columns=(), lines=()):
  cols = list(names) + ['mean', 'dev']
  ranks = {c: rank_order({k: row[c][0] for k, row in table.items()}) for c in cols}
  out = ['# Mixing strategies compared', '']
  if header:
    out += [header, '']
  out += [f'Final test loss (token-weighted, step {steps}, on the held-out test split no '
          f'strategy saw) per dataset and their mean (the analogue of the paper\'s mu); "mean '
          f'dev" = mean dev loss, which picks the best strategies; mean ± standard error over '
          f'seeds; **best**, <u>second best</u>. "steps to static" = first evaluation step at '
          f'which the strategy\'s seed-averaged mean dev loss reaches the best static '
          f'baseline\'s final one ({best_static}: {target:.4f}); speed-up = that of '
          f'{best_static} / this one. Train s = seconds in training steps per run (evaluation '
          f'and checkpoints left out); overhead = time per step against the static runs\' mean.'
          if best_static else 'No static baseline finished: no steps-to-static column.', '']
  if task_columns:
    out += ['Task columns: `python -m mos_jax.evaluate` scores of the final checkpoint (lm-eval '
            'metrics as task/metric, our summaries such as mu_MU), mean ± standard error over '
            'seeds.', '']
  head = ['strategy', 'seeds', *names, 'mean', 'mean dev', 'steps to static', 'speed-up',
          'train s', 'overhead', *task_columns]
  out += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, row in table.items():
    cells = [name, str(row['seeds'])]
    cells += [mark(fmt(row[c]), ranks[c][name]) for c in cols]
    cells.append(str(row['steps_to_target']) if row['steps_to_target'] else 'not reached')
    cells.append(f'{row["speedup"]:.2f}x' if row['speedup'] else '-')
    cells.append(f'{row["train_s"][0]:.1f}')
    cells.append(f'{100 * row["overhead"]:+.0f}%' if row['overhead'] is not None else '-')
    cells += [fmt(row['tasks'][c]) if c in row['tasks'] else '-' for c in task_columns]
    out.append('| ' + ' | '.join(cells) + ' |')
  out.append('')
  if missing:
    out += ['Missing (unfinished or failed): ' + ', '.join(f'{n} seed {s}' for n, s in missing),
            '']
  out += [METHOD, '']
  out += [f'- {line}' for line in lines]
  out += ['', verdict_line, '']
  with open(path, 'w') as f:
    f.write('\n'.join(out))


def write_csv(path, table, names, task_columns=(), tests=None, speed_tests=None):
  tests, speed_tests = tests or {}, speed_tests or {}
  head = ['strategy', 'seeds']
  for c in list(names) + ['mean']:
    head += [f'{c}_test_loss', f'{c}_test_loss_se']
  for c in names:
    head += [f'{c}_dev_loss', f'{c}_dev_loss_se']
  head += ['mean_dev_loss', 'mean_dev_loss_se']
  head += ['diff_vs_best_static', 'diff_se', 'diff_ci_lo', 'diff_ci_hi', 'diff_p', 'diff_p_holm',
           'speedup_mean', 'speedup_ci_lo', 'speedup_ci_hi']
  head += ['steps_to_static', 'speedup', 'train_s', 'train_s_se', 'overhead']
  for c in task_columns:
    head += [c, f'{c}_se']
  num = lambda x: '' if x is None or (isinstance(x, float) and math.isnan(x)) else repr(x)
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(head)
    for name, row in table.items():
      cells = [name, row['seeds']]
      for c in list(names) + ['mean'] + [f'dev/{n}' for n in names] + ['dev']:
        cells += [repr(row[c][0]), repr(row[c][1])]
      t, sp = tests.get(name), speed_tests.get(name)
      cells += ([num(t.mean), num(t.se), num(t.lo), num(t.hi), num(t.p), num(t.p_holm)]
                if t else [''] * 6)
      cells += [num(sp.mean), num(sp.lo), num(sp.hi)] if sp else [''] * 3
      cells += [row['steps_to_target'] or '', row['speedup'] or '', repr(row['train_s'][0]),
                repr(row['train_s'][1]), '' if row['overhead'] is None else repr(row['overhead'])]
      for c in task_columns:
        cells += [repr(row['tasks'][c][0]), repr(row['tasks'][c][1])] if c in row['tasks'] else ['', '']
      w.writerow(cells)


def plot_mixtures(path, present, results, seeds, names):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  if not present:
    return
  cols = min(4, len(present))
  rows = -(-len(present) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False,
                           sharey=True)
  for ax in axes.flat[len(present):]:
    ax.set_visible(False)
  for ax, name in zip(axes.flat, present):
    seed = next(s for s in seeds if (name, s) in results)  # the first finished seed
    for n in names:
      ax.plot(*results[(name, seed)].mixture[n], label=n)
    ax.set_title(f'{name} (seed {seed})', fontsize=9)
    ax.set_ylim(0, 1)
  axes.flat[0].legend(fontsize=7)
  fig.supxlabel('step')
  fig.supylabel('sampling probability')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_convergence(path, table, target, statics=()):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  if not table:
    return
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  colors = plt.get_cmap('tab20').colors  # 11 strategies: more than the default 10 colors
  for i, (name, row) in enumerate(table.items()):
    steps = sorted(row['curve'])
    ax.plot(steps, [row['curve'][s] for s in steps], label=name, color=colors[i % len(colors)],
            linestyle='--' if name in statics else '-')
  if target is not None:
    ax.axhline(target, color='grey', linewidth=0.8, linestyle=':')
  ax.set_xlabel('step')
  ax.set_ylabel('mean dev loss over datasets')
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
