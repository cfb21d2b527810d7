"""Training: `build(config, workdir)` makes a run (the one place that jits), `train(run)` drives
Algorithm 1 over it (`loop`), `resume` restores a run folder's latest checkpoint."""

from mos_jax.training.loop import train
from mos_jax.training.run import Run, TrainingError, build

__all__ = ['Run', 'TrainingError', 'build', 'train']
