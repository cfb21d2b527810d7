"""The terminal shows only the program's own lines; library log lines go to the log file."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Makes `torch` absent for the child (importlib.util.find_spec('torch') is None, `import torch`
# fails), as in a venv made from requirements.txt alone: transformers then logs its
# 'PyTorch was not found' advice while it is imported.
_NO_TORCH = "import sys\nsys.modules['torch'] = None\n"


def _run_without_torch(tmp_path, *args):
  site = tmp_path / 'site'
  site.mkdir(exist_ok=True)
  (site / 'sitecustomize.py').write_text(_NO_TORCH)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), REPO]),
             MOS_LOG_DIR=str(tmp_path / 'logs'))
  env.pop('TRANSFORMERS_NO_ADVISORY_WARNINGS', None)
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)


def test_transformers_import_advice_stays_off_the_terminal(tmp_path):
  probe = _run_without_torch(tmp_path, '-c', 'import transformers')
  assert 'PyTorch was not found' in probe.stderr  # The stand-in really hides torch.

  out = _run_without_torch(tmp_path, '-m', 'mos_jax.train', '--config', 'configs/demo.py')
  assert out.returncode == 1
  terminal = (out.stdout + out.stderr).strip().splitlines()
  assert terminal == [line for line in terminal if line.startswith('error: --workdir is required')]
  assert len(terminal) == 1
  log = (tmp_path / 'logs' / 'train.log').read_text()
  assert 'PyTorch was not found' in log  # Kept in the log file, not lost.
