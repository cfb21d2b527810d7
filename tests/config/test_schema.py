"""config.json is strict JSON and keeps inf."""

import json

from mos_jax.config import base_config, config_to_json


def _strict_json(line):
  def reject(constant):
    raise ValueError(f'non-standard JSON constant {constant}')
  return json.loads(line, parse_constant=reject)



def test_config_json_is_strict_and_keeps_inf():
  data = _strict_json(config_to_json(base_config()))
  assert data['mixing']['prior_temperature'] == 'inf'
  assert data['train']['lr'] == 1e-5
