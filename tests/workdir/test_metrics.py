"""metrics.jsonl and TensorBoard: resume equals an uninterrupted run, strict JSON, no files when off."""

import glob
import json

import jax.numpy as jnp
import numpy as np
import pytest

from mos_jax.workdir.metrics import MetricsWriter, read_metrics


def _strict_json(line):
  def reject(constant):
    raise ValueError(f'non-standard JSON constant {constant}')
  return json.loads(line, parse_constant=reject)


def _log(writer, steps):
  for step in steps:
    writer.write(step, {'train/loss': np.float32(1.0 / (step + 1)),
                        'mixture/math': jnp.asarray(0.25 + step / 1000),
                        'reward/math': float('nan') if step == 20 else step * 0.5})


def test_metrics_resume_equals_uninterrupted_run(tmp_path):
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  with MetricsWriter(str(straight)) as w:
    _log(w, range(0, 60, 10))
  # The interrupted run logged up to 40, but its last checkpoint is step 20.
  with MetricsWriter(str(resumed)) as w:
    _log(w, range(0, 50, 10))
  with MetricsWriter(str(resumed), resume_step=20) as w:
    assert [r['step'] for r in read_metrics(str(resumed))] == [0, 10, 20]
    _log(w, range(30, 60, 10))

  text = (straight / 'metrics.jsonl').read_text()
  assert (resumed / 'metrics.jsonl').read_text() == text
  rows = [_strict_json(line) for line in text.splitlines()]
  assert [r['step'] for r in rows] == [0, 10, 20, 30, 40, 50]
  assert rows[2]['reward/math'] == 'nan'
  assert np.isnan(read_metrics(str(straight))[2]['reward/math'])
  assert read_metrics(str(straight))[1]['mixture/math'] == pytest.approx(0.26)
  assert glob.glob(str(straight / 'tb' / 'events.out.tfevents.*'))


def test_fresh_run_starts_a_new_metrics_file(tmp_path):
  with MetricsWriter(str(tmp_path)) as w:
    _log(w, [0, 10])
  with MetricsWriter(str(tmp_path)) as w:  # No checkpoint: the run starts over.
    _log(w, [0])
  assert [r['step'] for r in read_metrics(str(tmp_path))] == [0]


def test_disabled_writer_creates_no_files(tmp_path):
  workdir = tmp_path / 'run'
  with MetricsWriter(str(workdir), enabled=False) as w:
    _log(w, [0, 10])
    w.flush()
  assert not workdir.exists()
