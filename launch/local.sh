#!/usr/bin/env bash
# Train on this machine: every local accelerator (or CPU) in one process.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local.sh [options] [--config.KEY=VALUE ...]

Runs `python -m mos_jax.train` on this machine with all local devices in one process.

Options:
  --config FILE[:ARG]  recipe (default: configs/demo.py)
  --workdir DIR        run folder (a local or mounted path; default: runs/local); rerun to resume
  --cpu-devices N      simulate N CPU devices (XLA_FLAGS), to try a mesh without accelerators
  --python BIN         interpreter (default: python)
  --dry-run            print the command instead of running it
  -h, --help           this help
Any --config.KEY=VALUE (e.g. --config.mesh.fsdp=-1) and anything after `--` goes to the trainer.
EOF
}

die() { echo "launch/local.sh: $*" >&2; echo "Run with --help for usage." >&2; exit 2; }

# Prints a command so that it can be pasted back into a shell.
show() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

config=configs/demo.py workdir=runs/local python=python cpu_devices='' dry_run=0 extra=()
while (($#)); do
  case $1 in
    --config) (($# > 1)) || die "--config needs a value"; config=$2; shift 2 ;;
    --workdir) (($# > 1)) || die "--workdir needs a value"; workdir=$2; shift 2 ;;
    --cpu-devices) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || die "--cpu-devices needs a positive integer"
      cpu_devices=$2; shift 2 ;;
    --python) (($# > 1)) || die "--python needs a value"; python=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --config.*|--noconfig.*) extra+=("$1"); shift ;;
    --) shift; extra+=("$@"); break ;;
    *) die "unknown argument: $1" ;;
  esac
done

cd "$(dirname "$0")/.."
cmd=("$python" -m mos_jax.train --config "$config" --workdir "$workdir" ${extra[@]+"${extra[@]}"})
env_prefix=()
if [[ -n $cpu_devices ]]; then
  env_prefix=(env JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$cpu_devices")
fi
cmd=(${env_prefix[@]+"${env_prefix[@]}"} "${cmd[@]}")

if ((dry_run)); then
  show "${cmd[@]}"
else
  exec "${cmd[@]}"
fi
