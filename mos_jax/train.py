"""Fine-tune with a learned data mixture (Mixture-of-Skills).

  python -m mos_jax.train --config configs/demo.py --workdir runs/demo [--config.KEY=VALUE ...]

Running it again on the same workdir resumes from the latest checkpoint.
"""

import logging

from absl import app
from absl import flags

from mos_jax import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder: metrics, plots, checkpoints.')
_CONFIG = cli.define_config_flag()


def main(argv):
  del argv
  config = _CONFIG.value
  logging.getLogger().setLevel(logging.INFO)
  from mos_jax import trainer  # Imported after flag parsing: it pulls in jax and the data stack.
  trainer.train(trainer.build(config, _WORKDIR.value))


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main, flags_parser=cli.parse_flags)
