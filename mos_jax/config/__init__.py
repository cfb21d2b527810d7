"""Run configuration: the schema (`base_config`, `dataset`), its checks, the paper recipes and the
reference table the docs print.

Users' recipe files import `base_config`, `dataset` and `config_to_json` from here.
"""

from mos_jax.config.schema import base_config
from mos_jax.config.schema import config_to_json
from mos_jax.config.schema import dataset

__all__ = ['base_config', 'config_to_json', 'dataset']
