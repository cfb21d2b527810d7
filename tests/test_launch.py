"""The launchers' --dry-run prints the commands they would run; bad arguments fail with a message."""

import os
import re
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ['launch/local.sh', 'launch/tpu_pod.sh', 'launch/gpu_slurm.sbatch']
JAX_VERSION = re.search(r'^jax==(\S+)', open(os.path.join(ROOT, 'requirements.txt')).read(), re.M)[1]
OVERRIDES = ['--config.mesh.fsdp=-1', '--config.train.lr=3e-5']


def launch(script, *args):
  env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  return subprocess.run(['bash', script, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=30)


def train_argv(python, config, workdir, *extra):
  return [python, '-m', 'mos_jax.train', '--config', config, '--workdir', workdir, *extra]


def contains(seq, sub):
  return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_exits_zero(script):
  r = launch(script, '--help')
  assert r.returncode == 0 and 'Usage' in r.stdout and '--dry-run' in r.stdout


@pytest.mark.parametrize('script', SCRIPTS)
@pytest.mark.parametrize('args,message', [
    (['--bogus'], 'unknown argument: --bogus'),
    (['--config'], '--config needs a value'),
])
def test_bad_arguments_fail_with_a_message(script, args, message):
  r = launch(script, '--dry-run', '--tpu-name', 't', '--zone', 'z', *args) \
      if 'tpu' in script else launch(script, '--dry-run', *args)
  assert r.returncode != 0 and message in r.stderr and not r.stdout


def test_local_dry_run():
  r = launch('launch/local.sh', '--dry-run', '--config', 'configs/paper.py:qwen-diff',
             '--workdir', 'runs/my run', OVERRIDES[0], '--', OVERRIDES[1])
  assert r.returncode == 0, r.stderr
  assert shlex.split(r.stdout) == train_argv(
      'python', 'configs/paper.py:qwen-diff', 'runs/my run', *OVERRIDES)


def test_local_dry_run_simulated_devices():
  r = launch('launch/local.sh', '--dry-run', '--cpu-devices', '8')
  assert shlex.split(r.stdout) == [
      'env', 'JAX_PLATFORMS=cpu', 'XLA_FLAGS=--xla_force_host_platform_device_count=8',
      *train_argv('python', 'configs/demo.py', 'runs/local')]
  assert launch('launch/local.sh', '--cpu-devices', 'x').returncode != 0


def _tpu(*args):
  r = launch('launch/tpu_pod.sh', '--dry-run', '--tpu-name', 'mos-v4', '--zone', 'us-central2-b',
             *args)
  assert r.returncode == 0, r.stderr
  return [shlex.split(line) for line in r.stdout.splitlines() if not line.startswith('#')]


def test_tpu_pod_dry_run():
  lines = _tpu('--config', 'configs/paper.py:qwen-diff', '--workdir', '/mnt/gcs/qwen',
               *OVERRIDES)
  gcloud = [l for l in lines if l[0] == 'gcloud']
  verbs = [l[4] for l in gcloud]
  assert verbs == ['describe', 'create', 'scp', 'ssh', 'ssh', 'ssh', 'ssh', 'scp']
  assert all(l[:4] == ['gcloud', 'compute', 'tpus', 'tpu-vm'] and '--zone=us-central2-b' in l
             for l in gcloud)
  create = gcloud[1]
  assert '--accelerator-type=v4-8' in create and '--version=tpu-ubuntu2204-base' in create
  assert all('--worker=all' in l for l in gcloud[2:])
  upload, unpack, install, train, stop, fetch = gcloud[2:]
  assert upload[-4].endswith('.tgz') and upload[-3] == 'mos-v4:~/mos_jax.tgz'
  assert 'tar -xzf ~/mos_jax.tgz' in unpack[-1]
  assert f'jax[tpu]=={JAX_VERSION}' in install[-1] and 'requirements.txt' in install[-1]
  remote = shlex.split(train[-1].removeprefix('--command='))
  assert 'MOS_DISTRIBUTED=auto' in remote
  # The trainers outlive a dropped ssh session; Ctrl-C/SIGTERM here reaches them as SIGTERM.
  assert "trap '' HUP" in train[-1] and 'tee -p' in train[-1]
  assert stop[-1] == "--command=pkill -TERM -f -- '-m mos_jax.train' || true"
  assert contains(remote, train_argv('python3', 'configs/paper.py:qwen-diff', '/mnt/gcs/qwen',
                                     *OVERRIDES))
  assert fetch[5] == '--recurse' and fetch[6] == 'mos-v4:~/mos_jax_logs'
  assert any(l[0] == 'tar' for l in lines)  # The repo is packed before the upload.


def test_tpu_pod_dry_run_v5e_spot_no_install_delete():
  lines = _tpu('--accelerator-type', 'v5e-8', '--spot', '--skip-install', '--delete',
               '--project', 'proj')
  create = next(l for l in lines if l[4:5] == ['create'])
  assert '--accelerator-type=v5litepod-8' in create and '--version=v2-alpha-tpuv5-lite' in create
  assert '--spot' in create and '--project=proj' in create
  assert not any('pip install' in l[-1] for l in lines)
  assert lines[-1][4:6] == ['delete', 'mos-v4']


@pytest.mark.parametrize('args,message', [
    (['--zone', 'z'], '--tpu-name is required'),
    (['--tpu-name', 't'], '--zone is required'),
    (['--tpu-name', 't', '--zone', 'z', '--accelerator-type', 'x9-8'], 'pass --version'),
])
def test_tpu_pod_required_arguments(args, message):
  r = launch('launch/tpu_pod.sh', '--dry-run', *args)
  assert r.returncode != 0 and message in r.stderr


def test_slurm_dry_run():
  r = launch('launch/gpu_slurm.sbatch', '--dry-run', '--config', 'configs/paper.py:llama-diff',
             '--workdir', '/shared/runs/llama', '--setup', 'source ~/venv/bin/activate',
             *OVERRIDES)
  assert r.returncode == 0, r.stderr
  argv = shlex.split(r.stdout)
  assert argv[:3] == ['srun', '--kill-on-bad-exit=1', '--ntasks-per-node=8']
  assert argv[3:5] == ['bash', '-c']
  inner = shlex.split(argv[5])
  assert inner[:3] == ['cd', ROOT, '&&'] and 'source' in inner
  assert inner[inner.index('python') - 1] == 'exec'  # Signals reach the trainer itself.
  with open(os.path.join(ROOT, 'launch', 'gpu_slurm.sbatch')) as f:
    assert '#SBATCH --signal=TERM@300' in f.read()  # SIGTERM before the time limit.
  assert contains(inner, train_argv('python', 'configs/paper.py:llama-diff', '/shared/runs/llama',
                                    *OVERRIDES))


def test_slurm_dry_run_per_node():
  argv = shlex.split(launch('launch/gpu_slurm.sbatch', '--dry-run', '--per-node').stdout)
  assert argv[2:4] == ['--ntasks-per-node=1', '--gpus-per-node=8']


def test_slurm_outside_a_job_fails():
  r = launch('launch/gpu_slurm.sbatch')
  assert r.returncode != 0 and 'sbatch' in r.stderr


def _stubs(tmp_path, **scripts):
  """A folder of stand-in commands (bash bodies), first on PATH."""
  folder = tmp_path / 'bin'
  folder.mkdir()
  for name, body in scripts.items():
    path = folder / name
    path.write_text('#!/usr/bin/env bash\n' + body + '\n')
    path.chmod(0o755)
  return f'{folder}:{os.environ["PATH"]}'


@pytest.mark.parametrize('srun_status,restarts,requeued', [
    (75, 0, True), (137, 1, True), (75, 3, False), (1, 0, False), (0, 0, False)])
def test_slurm_requeues_a_job_that_lost_a_host(tmp_path, srun_status, restarts, requeued):
  calls = tmp_path / 'calls'
  path = _stubs(tmp_path, srun=f'echo "srun $*" >> {calls}; exit {srun_status}',
                scontrol=f'echo "scontrol $*" >> {calls}')
  env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  env.update(PATH=path, SLURM_JOB_ID='42', SLURM_JOB_NODELIST='n[1-2]',
             SLURM_RESTART_COUNT=str(restarts))
  r = subprocess.run(['bash', 'launch/gpu_slurm.sbatch', '--workdir', '/shared/run'], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=30)
  assert r.returncode == srun_status, r.stderr
  lines = calls.read_text().splitlines()
  assert lines[0].startswith('srun ')
  assert (lines[1:] == ['scontrol requeue 42']) == requeued, lines
  if requeued:
    assert 'resumes from the last checkpoint in /shared/run' in r.stdout
  elif srun_status in (75, 137):
    assert 'already requeued 3 times' in r.stderr


def test_tpu_pod_names_the_lost_worker_and_exits_75(tmp_path):
  paragraph = ('host 1 of 2 stopped answering (heartbeat timeout after 100 s) at step 31; the '
               'last checkpoint is step 20 in /mnt/gcs/run/checkpoints. Restart the job (any '
               'host count) to resume.')
  # The trainers' ssh fails (a worker's VM is gone); the log fetch brings the survivor's log.
  gcloud = f'''
case " $* " in
  *" ssh "*mos_jax.train*) exit 255 ;;
  *" scp --recurse "*) mkdir -p "${{@: -3:1}}/mos_jax_logs"
                       echo 'error: {paragraph}' > "${{@: -3:1}}/mos_jax_logs/train-w0.log"; exit 1 ;;
esac
exit 0'''
  env = {**os.environ, 'PATH': _stubs(tmp_path, gcloud=gcloud), 'TMPDIR': str(tmp_path)}
  r = subprocess.run(['bash', 'launch/tpu_pod.sh', '--tpu-name', 'pod', '--zone', 'z',
                      '--skip-install', '--workdir', '/mnt/gcs/run', '--log-dir',
                      str(tmp_path / 'logs')], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 75, r.stderr
  assert 'worker 1 of pod was lost (host 1 of 2 stopped answering (heartbeat timeout after 100 s)' \
         ' at step 31)' in r.stderr
