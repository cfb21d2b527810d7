"""Fine-tune with a learned data mixture (Mixture-of-Skills).

  python -m mos_jax.train --config configs/demo.py --workdir runs/demo [--config.KEY=VALUE ...]

Running it again on the same workdir resumes from the latest checkpoint. SIGTERM saves the
current step and exits 0, Ctrl-C does the same and exits 130 (a second Ctrl-C aborts at once).
Library logs go to DIR/train.log; --alsologtostderr shows them here too.
"""

from absl import flags

from mos_jax.infra import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder: metrics, plots, checkpoints, log.')
_CONFIG = cli.define_config_flag()


def main(argv):
  del argv
  from mos_jax import training  # Imported after flag parsing: it pulls in jax and the data stack.
  run = training.build(_CONFIG.value, _WORKDIR.value)
  training.train(run)
  return run.exit_code


if __name__ == '__main__':
  cli.run(main, 'train', required=('config', 'workdir'), log_in_workdir=True)
