"""jax's persistent compilation cache, on by default, so a resumed or repeated run skips compiling."""

import logging
import os

import jax

log = logging.getLogger(__name__)


def enable(path: str) -> str:
  """Points jax's persistent cache at `path` (`~` expanded); '' leaves it off.

  A cache folder already chosen outside the config (JAX_COMPILATION_CACHE_DIR, or
  jax.config.update by the caller) wins. Returns the folder in use ('' = none).
  """
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  if not path:
    return ''
  path = os.path.expanduser(path)
  os.makedirs(path, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', path)
  # Every compile of a training step takes seconds; cache them all, small ones too.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  log.info('Persistent compilation cache: %s', path)
  return path
