"""train.compilation_cache: a jitted step compiled once is read back from the folder."""

import os
import subprocess
import sys

from demo_run import REPO

_SCRIPT = '''
import sys, jax, jax.numpy as jnp
from mos_jax.infra import compilation_cache
assert compilation_cache.enable(sys.argv[1]) == sys.argv[1]
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == '/jax/compilation_cache/cache_hits' else None)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
print(float(jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(3)).sum()), len(hits))
'''


def test_compilation_cache_folder_is_filled_and_reused(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_PERSISTENT_CACHE')
         and k != 'JAX_COMPILATION_CACHE_DIR'}
  env['JAX_PLATFORMS'] = 'cpu'
  run = lambda: subprocess.run([sys.executable, '-c', _SCRIPT, str(tmp_path / 'cache')], cwd=REPO,
                               env=env, check=True, capture_output=True, text=True)
  value, hits = run().stdout.split()
  assert os.listdir(tmp_path / 'cache') and hits == '0'
  again, hits = run().stdout.split()
  assert again == value and int(hits) > 0  # The second process reads the compiled code back.
