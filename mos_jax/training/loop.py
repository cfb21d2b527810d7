"""The training loop: Algorithm 1 of the paper around a built run (`run.build`).

Train steps with the loader's draws, the strategy's updates every `mixing.update_every` steps,
metrics windows, dev evaluation, checkpoints. It stops cleanly on SIGTERM/SIGINT
(`infra.preemption`: save the current step, exit), ends with one paragraph and exit 75 when a
host of a multi-host run is lost (`infra.lost_host`), and never checkpoints a state whose latest
update was non-finite.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import numpy as np

from mos_jax.data import prefetch
from mos_jax.evals.during_training import TrainingTasks
from mos_jax.infra import distributed
from mos_jax.infra import lost_host
from mos_jax.infra import preemption
from mos_jax.steps import reference_cache
from mos_jax.steps import reward as reward_lib
from mos_jax.steps.state import learning_rate
from mos_jax.training.run import Run, TrainingError
from mos_jax.workdir import plots
from mos_jax.workdir import report


def evaluate(run: Run) -> dict[str, float]:
  """Token-weighted dev loss per dataset (datasets without dev examples are left out)."""
  out = {}
  limit = run.config.train.eval_batches
  for name in run.data.names:
    sums = []
    for i, batch in enumerate(run.data.dev_batches(name)):
      if limit and i >= limit:
        break
      sums.append(run.eval_fn(run.state.params,
                              distributed.host_local_to_global(batch, run.mesh)))
    nll_sum, tokens = np.sum(jax.device_get(sums), axis=0) if sums else (0.0, 0.0)
    if tokens > 0:
      out[f'eval/{name}/loss'] = float(nll_sum / tokens)
  if run.config.train.get('eval_tasks'):  # Skills exact match, lm-eval tasks (evals.tasks).
    if run.eval_tasks is None:
      run.eval_tasks = TrainingTasks(run.config, run.data, run.graphdef, run.state.params,
                                     run.mesh, run.frozen)
    out.update(run.eval_tasks(run.state.params))
  return out


def evaluate_test(run: Run) -> dict[str, float]:
  """Token-weighted loss per dataset on the whole held-out test split (datasets without one are
  left out). Called once, after the last step: nothing that steers training reads it."""
  out = {}
  for name in run.data.names:
    sums = [run.eval_fn(run.state.params, distributed.host_local_to_global(batch, run.mesh))
            for batch in run.data.test_batches(name)]
    nll_sum, tokens = np.sum(jax.device_get(sums), axis=0) if sums else (0.0, 0.0)
    if tokens > 0:
      out[f'test/{name}/loss'] = float(nll_sum / tokens)
  return out


def update_mixture(run: Run) -> dict[str, float]:
  """Algorithm 1 lines 6-11: the strategy's signals from one batch of every dataset (train reward
  batches and/or dev batches, as its signals need), then its update."""
  names = run.data.names
  batches = {}
  needed = reward_lib.batches_needed(run.strategy.signals)
  if 'train' in needed:
    batch = reward_lib.stack_reward_batches(run.data.train.reward_batches(), names)
    if run.reference_tables is not None:
      batch['nll0'] = reference_cache.lookup(run.reference_tables, names, batch)
    batches['train'] = distributed.host_local_to_global(batch, run.mesh)
  if 'dev' in needed:  # Dev windows are indexed by the update, so a resumed run gets the same.
    window = run.data.train.step // run.config.mixing.update_every
    dev = {n: run.data.dev_window(n, window, run.config.data.reward_batch_size) for n in names}
    batches['dev'] = distributed.host_local_to_global(reward_lib.stack_reward_batches(dev, names), run.mesh)
  reward_out = run.reward_fn(run.state.params, batches)
  new_mixing, info = run.mixing_fn(run.state.mixing, reward_out)
  run.state = run.state.replace(mixing=new_mixing)
  info = jax.device_get(info)
  out = {}
  for i, name in enumerate(names):
    out[f'reward/{name}'] = float(info['reward'][i])
    out[f'reward_raw/{name}'] = float(info['raw_reward'][i])
  return out


def current_probs(run: Run) -> np.ndarray:
  return np.asarray(jax.device_get(run.probs_fn(run.state.mixing)), np.float64)


class _Window:
  """Train metrics gathered on the host between two metrics lines (token-weighted).

  Non-finite (skipped) steps are left out of the losses; their count is logged separately.
  """

  def __init__(self, names, train_config, first_step, feed, check, pending=()):
    self.names, self.train_config, self.feed, self.check = names, train_config, feed, check
    self.pending = list(pending)  # Restored from a checkpoint written between two log steps.
    self.start, self.first_step = time.perf_counter(), first_step
    self.waited = feed.wait_s  # The loop's total wait for batches at the window's start.

  def add(self, metrics):
    self.pending.append(metrics)

  def to_json(self) -> list:
    """The unlogged steps' metrics, for a checkpoint saved between two log steps (exact types)."""
    return [{k: [str(v.dtype), v.tolist()] for k, v in m.items()}
            for m in jax.device_get(self.pending)]

  def pause(self, seconds: float):
    """Leaves time spent on evaluation and checkpoints out of the step timings."""
    self.start += seconds

  def flush(self, step: int, skipped_steps: int) -> dict[str, float]:
    pending = jax.device_get(self.pending)  # Metrics are read here only: the device never waits.
    for m in pending:
      self.check(m)
    got = [m for m in pending if m['finite']]
    elapsed, steps_done = time.perf_counter() - self.start, max(1, step - self.first_step)
    waited, self.waited = self.feed.wait_s - self.waited, self.feed.wait_s
    self.pending, self.start, self.first_step = [], time.perf_counter(), step
    tokens = sum(float(m['tokens']) for m in got)
    ds_nll = sum((m['dataset_nll'] for m in got), np.zeros(len(self.names)))
    ds_tokens = sum((m['dataset_tokens'] for m in got), np.zeros(len(self.names)))
    out = {'train/loss': float(ds_nll.sum() / tokens) if tokens else float('nan'),
           'train/grad_norm': float(np.mean([m['grad_norm'] for m in got])) if got else float('nan'),
           'train/tokens': tokens,
           # Skipped updates do not advance optax's count: step s used count s - 1 - skipped.
           'train/lr': learning_rate(self.train_config, step - 1 - skipped_steps),
           'train/skipped_steps': skipped_steps,
           'perf/tokens_per_s': tokens / max(elapsed, 1e-9),
           'perf/real_token_fraction': (sum(float(m['real_tokens']) for m in got)
                                        / max(sum(float(m['positions']) for m in got), 1.0)),
           'perf/real_tokens_per_s': (sum(float(m['real_tokens']) for m in got)
                                      / max(elapsed, 1e-9)),
           'perf/data_wait_fraction': waited / max(elapsed, 1e-9),
           'perf/step_s': elapsed / steps_done}
    for i, name in enumerate(self.names):
      if ds_tokens[i] > 0:
        out[f'train/loss/{name}'] = float(ds_nll[i] / ds_tokens[i])
    return out


def train(run: Run) -> dict:
  """Runs from `run.start_step` to `config.train.steps`; returns the summary (on process 0).

  A SIGTERM or SIGINT ends it early after saving the current step: then `run.stopped_by` names
  the signal, `run.exit_code` is 0 (SIGTERM) or 130 (SIGINT) and the summary is empty.
  """
  stop = preemption.StopSignals().install()
  with jax.set_mesh(run.mesh):  # Activation sharding constraints need the mesh when tracing.
    try:
      return _train_loop(run, stop)
    except Exception as e:
      lost_host.settle(e)  # A lost host: its paragraph and exit 75 (else the error goes on).
      raise
    finally:
      stop.restore()
      run.data.close()
      run.close()


def _train_loop(run: Run, stop: preemption.StopSignals) -> dict:
  config, data, names = run.config, run.data, run.data.names
  tc = config.train
  is_main = distributed.is_main_process()
  data.train.set_probabilities(current_probs(run))

  progress = None
  if is_main and tc.progress_bar:
    from tqdm.auto import tqdm
    progress = tqdm(total=tc.steps, initial=run.start_step, dynamic_ncols=True, desc='train')
  say = (progress.write if progress is not None else print) if is_main else (lambda _: None)

  if run.start_step == 0:
    first = evaluate(run)
    say(_eval_text(0, first, names))
    run.writer.write(0, {**first, **_mixture_metrics(run, data.train.get_state())})

  updates_after = lambda step: (run.strategy.updates_scorer
                                 and (step - 1) % config.mixing.update_every == 0)
  # The draw after a step that moves the mixture must use the new one: the prefetcher holds there.
  moves_after = lambda step: run.strategy.moves_after(step) or updates_after(step)
  feed = prefetch.Prefetcher(data.train, functools.partial(distributed.host_local_to_global,
                                                           mesh=run.mesh),
                             run.start_step + 1, tc.steps, config.data.prefetch, moves_after)
  window = _Window(names, tc, run.start_step, feed, functools.partial(_check_finite, run),
                   run.window)
  try:
    for step in range(run.start_step + 1, tc.steps + 1):
      lost_host.at_step(step)  # Named by the paragraph if a host is lost now.
      run.state, metrics = run.train_fn(run.state, feed.next(step))
      window.add(metrics)
      if run.strategy.moves_after(step):  # It moved p in the train step (ODM, replay).
        data.train.set_probabilities(current_probs(run))

      line = {}
      # Algorithm 1 counts t = 0..T and updates psi after the theta update when t % S == 0; our
      # step is t + 1, so the scorer moves after steps 1, S + 1, 2S + 1, ...
      if updates_after(step):
        line.update(update_mixture(run))
        data.train.set_probabilities(current_probs(run))
      if moves_after(step):
        feed.resume()
      last = step == tc.steps
      checkpoint_now = (tc.checkpoint_every and step % tc.checkpoint_every == 0) or last
      # Windows also restart at checkpoints, so a resumed run logs what an uninterrupted one does.
      if step % tc.log_every == 0 or checkpoint_now:
        line.update(window.flush(step, int(jax.device_get(run.state.skipped_steps))))
        line.update(_step_rewards(run))
      paused = time.perf_counter()
      if (tc.eval_every and step % tc.eval_every == 0) or last:
        dev = evaluate(run)
        say(_eval_text(step, dev, names))
        line.update(dev)
      if last:  # Training is over: the test split is read here, and only here.
        test = evaluate_test(run)
        if test:
          say(_eval_text(step, test, names, 'test'))
        line.update(test)
      if checkpoint_now:
        _save(run, step, feed, run.meta, say)  # The loader position of step + 1.
      window.pause(time.perf_counter() - paused)
      if line:
        line.update(_mixture_metrics(run, feed.position))  # Every line has the mixture.
        run.writer.write(step, line)
        if progress is not None and 'train/loss' in line:
          progress.set_postfix_str(_progress_text(line, names))
      if progress is not None:
        progress.update(1)
      if not last and stop.at(step):
        # The window's unlogged steps travel in the checkpoint, so the resumed run logs exactly
        # what an uninterrupted one does.
        saved = _save(run, step, feed, {**run.meta, 'window': window.to_json()}, say)
        run.checkpointer.wait()  # Durable before the process exits.
        run.stopped_by, run.exit_code = stop.name, stop.exit_code
        break
  finally:
    feed.close()
    if progress is not None:
      progress.close()
    run.checkpointer.wait()
    run.writer.close()
  run.checkpointer.close()
  if run.stopped_by:
    where = (f'saved step {step} in {run.checkpointer.directory}' if saved else
             f'the last good checkpoint is step {run.saved_step}' if run.saved_step else
             'no checkpoint was written')
    say(f'Stopped by {run.stopped_by} after step {step}; {where}. Run the same command to '
        f'resume.')
    return {}
  if not is_main:  # Only process 0 has the metrics file.
    return {}
  summary = report.summarize(os.path.join(run.workdir, 'metrics.jsonl'), names)
  plots.write_plots(run.workdir)
  print(report.format_summary(summary))
  return summary


def _save(run: Run, step: int, loader, meta: dict, say) -> bool:
  """Starts a checkpoint of `step` unless the latest update was non-finite (then the state is
  the last good one, but resuming from it would repeat the streak's start: keep the older one)."""
  if int(jax.device_get(run.state.bad_steps)):
    say(f'warning: step {step} is not checkpointed: its update was non-finite (skipped).')
    return False
  run.checkpointer.save(step, run.state, loader, meta)
  run.saved_step = step
  return True


def _check_finite(run: Run, metrics):
  bad = int(jax.device_get(metrics['bad_steps']))
  if bad >= run.config.train.max_bad_steps:
    where = (f'The last good checkpoint is step {run.saved_step} ({run.checkpointer.directory}): '
             f'run the same command with a lower --config.train.lr to resume from it.'
             if run.saved_step else 'No checkpoint was written: start again with a lower '
             '--config.train.lr.')
    raise TrainingError(
        f'{bad} non-finite updates in a row (loss or gradient is NaN/inf); stopping (those updates '
        f'were skipped and no checkpoint was written during them). {where} Also check the data, '
        f'or raise train.max_bad_steps.')


def _step_rewards(run: Run) -> dict[str, float]:
  """reward/<name> of a strategy that updates every step (none for the others)."""
  reward = run.strategy.step_rewards(run.state.mixing)
  if reward is None:
    return {}
  return {f'reward/{n}': float(r) for n, r in zip(run.data.names, jax.device_get(reward))}


def _mixture_metrics(run: Run, position: dict) -> dict[str, float]:
  """p (over mixing.unit), the row draws it makes (`mixture_rows`), and the training examples
  drawn so far per dataset, also as passes over it (`data/epochs`), at the loader `position`."""
  out = {}
  names, probs = run.data.names, current_probs(run)
  for i, name in enumerate(names):
    out[f'mixture/{name}'] = float(probs[i])
    out[f'mixture_rows/{name}'] = float(position['draw'][i])
    out[f'data/examples/{name}'] = float(position['examples'][i])
    out[f'data/epochs/{name}'] = position['examples'][i] / run.data.sizes[i]
  return out


def _eval_text(step, dev, names, split='eval'):
  losses = ' '.join(f'{n}={dev[f"{split}/{n}/loss"]:.3f}' for n in names
                    if f'{split}/{n}/loss' in dev)
  return f'step {step}: {"dev" if split == "eval" else split} loss {losses}'


def _progress_text(line, names):
  mix = ' '.join(f'{n[:6]}={line[f"mixture/{n}"]:.2f}' for n in names)
  return f'loss={line["train/loss"]:.3f} tok/s={line["perf/tokens_per_s"]:.0f} {mix}'
