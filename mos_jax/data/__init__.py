"""Data: formats -> conversations, chat templates + loss mask, Grain pipelines, the mixture loader.

`build_data(config, process_index, process_count) -> DataBundle` is the entry point
(see docs/interfaces.md for the batch format).
"""

from mos_jax.data.bundle import DataBundle
from mos_jax.data.bundle import build_data
from mos_jax.data.mixture import check_probabilities

__all__ = ['DataBundle', 'build_data', 'check_probabilities']
