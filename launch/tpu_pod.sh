#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create (or reuse) it, copy this repo to every worker, install
# the TPU build of jax, run the same train command on all workers, fetch their logs.
# Exit code: the trainers' (0 done or stopped by SIGTERM, 130 Ctrl-C, 1 an error); 75 when a
# worker was lost (its VM died or stopped answering): the others stop with one paragraph naming
# it, this script says which worker died and exits 75, so a retry loop (`until ...; do :; done`
# on 75) restarts the run, which resumes from the last checkpoint.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --tpu-name NAME --zone ZONE [options] [--config.KEY=VALUE ...]

Options:
  --tpu-name NAME          TPU VM name (reused when it exists)                     [required]
  --zone ZONE              e.g. us-central2-b (v4), us-west4-a (v5e)                [required]
  --accelerator-type TYPE  v4-8, v4-32, v5litepod-8 (v5e-8 is accepted), v5p-8, v6e-8 (default v4-8)
  --version VERSION        TPU VM runtime (default: the base image for the accelerator)
  --project PROJECT        Google Cloud project (default: gcloud's configured one)
  --spot                   create a Spot (preemptible) slice
  --config FILE[:ARG]      recipe, relative to the repo (default: configs/demo.py)
  --workdir DIR            run folder; on multi-host slices a gcsfuse mount every worker sees (default: runs/tpu)
  --remote-dir DIR         where the repo goes on each worker, relative to home (default: mos_jax)
  --log-dir DIR            local folder for the workers' logs (default: launch-logs/NAME)
  --python BIN             interpreter on the workers (default: python3)
  --skip-install           reuse the packages already installed on the workers
  --delete                 delete the TPU VM after the run (and after fetching logs)
  --dry-run                print the commands instead of running them
  -h, --help               this help
Any --config.KEY=VALUE (e.g. --config.mesh.fsdp=-1) and anything after `--` goes to the trainer.
EOF
}

die() { echo "launch/tpu_pod.sh: $*" >&2; echo "Run with --help for usage." >&2; exit 2; }

show() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

need() { (($1 > 1)) || die "$2 needs a value"; }

name='' zone='' accel=v4-8 version='' project='' spot=0 config=configs/demo.py workdir=runs/tpu
remote_dir=mos_jax log_dir='' python=python3 install=1 delete=0 dry_run=0 extra=()
while (($#)); do
  case $1 in
    --tpu-name) need $# "$1"; name=$2; shift 2 ;;
    --zone) need $# "$1"; zone=$2; shift 2 ;;
    --accelerator-type) need $# "$1"; accel=$2; shift 2 ;;
    --version) need $# "$1"; version=$2; shift 2 ;;
    --project) need $# "$1"; project=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --config) need $# "$1"; config=$2; shift 2 ;;
    --workdir) need $# "$1"; workdir=$2; shift 2 ;;
    --remote-dir) need $# "$1"; remote_dir=$2; shift 2 ;;
    --log-dir) need $# "$1"; log_dir=$2; shift 2 ;;
    --python) need $# "$1"; python=$2; shift 2 ;;
    --skip-install) install=0; shift ;;
    --delete) delete=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --config.*|--noconfig.*) extra+=("$1"); shift ;;
    --) shift; extra+=("$@"); break ;;
    *) die "unknown argument: $1" ;;
  esac
done
[[ -n $name ]] || die "--tpu-name is required"
[[ -n $zone ]] || die "--zone is required"
accel=${accel/#v5e-/v5litepod-}  # gcloud calls v5e slices v5litepod-N.
if [[ -z $version ]]; then
  case $accel in
    v4-*) version=tpu-ubuntu2204-base ;;
    v5litepod-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) die "unknown accelerator type $accel: pass --version" ;;
  esac
fi
[[ $workdir == /mnt/* ]] || echo "launch/tpu_pod.sh: note: --workdir $workdir is on each worker's" \
  "own disk unless it is a shared mount; a multi-host slice needs one (gcsfuse, see launch/README.md)." >&2

root=$(cd "$(dirname "$0")/.." && pwd)
jax_version=$(sed -n 's/^jax==//p' "$root/requirements.txt")
log_dir=${log_dir:-launch-logs/$name}
tarball=${TMPDIR:-/tmp}/mos_jax-$name.tgz
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone" ${project:+--project="$project"})
create=("${gcloud_tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accel" --version="$version")
((spot)) && create+=(--spot)

# The same quoted command line runs on every worker; process 0 writes metrics and checkpoints.
train=("$python" -m mos_jax.train --config "$config" --workdir "$workdir" ${extra[@]+"${extra[@]}"})
# `trap '' HUP` + `tee -p`: a dropped ssh session neither kills the trainers nor breaks their
# output; they stop only on SIGTERM (preemption notice, or remote_stop below), after saving.
remote_train="set -o pipefail; trap '' HUP; mkdir -p ~/mos_jax_logs && cd ~/$remote_dir && MOS_DISTRIBUTED=auto $(show "${train[@]}") 2>&1 | tee -p ~/mos_jax_logs/train-\$(hostname).log"
remote_stop="pkill -TERM -f -- '-m mos_jax.train' || true"
remote_install="cd ~/$remote_dir && $python -m pip install -q -r requirements.txt && $python -m pip install -q -U \"jax[tpu]==$jax_version\""

run() { if ((dry_run)); then show "$@"; else "$@"; fi; }

if ((dry_run)); then
  echo "# reuse $name if this succeeds, else create it:"
  show "${gcloud_tpu[@]}" describe "$name" "${where[@]}"
  show "${create[@]}"
elif "${gcloud_tpu[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
  echo "Reusing TPU VM $name."
else
  run "${create[@]}"
fi
run tar -czf "$tarball" -C "$root" --exclude=.git --exclude=runs --exclude=launch-logs \
  --exclude=__pycache__ --exclude=.venv .
run "${gcloud_tpu[@]}" scp "$tarball" "$name:~/mos_jax.tgz" "${where[@]}" --worker=all
run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all \
  --command="mkdir -p ~/$remote_dir && tar -xzf ~/mos_jax.tgz -C ~/$remote_dir"
if ((install)); then
  run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$remote_install"
fi
status=0
if ((dry_run)); then
  show "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$remote_train"
  echo "# on Ctrl-C or SIGTERM, every worker's trainer gets SIGTERM (saves the same step, exits):"
  show "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$remote_stop"
else
  # ssh in its own session, so a Ctrl-C here reaches only this script, which forwards it.
  setsid "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$remote_train" &
  ssh_pid=$!
  trap '"${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$remote_stop"' INT TERM
  while kill -0 "$ssh_pid" 2>/dev/null; do wait "$ssh_pid" && status=0 || status=$?; done
  trap - INT TERM
fi
run mkdir -p "$log_dir"
# A lost worker has no logs to give: fetch what the others have.
run "${gcloud_tpu[@]}" scp --recurse "$name:~/mos_jax_logs" "$log_dir" "${where[@]}" --worker=all \
  || echo "launch/tpu_pod.sh: could not fetch every worker's log." >&2
if ((status != 0 && !dry_run)); then
  # The survivors' paragraph ('host N of M stopped answering ...') names the lost worker.
  lost=$(grep -rhoE 'hosts? [0-9, ]+ of [0-9]+ stopped answering[^;]*' "$log_dir" 2>/dev/null \
         | sort -u | head -n 1 || true)
  if [[ -n $lost ]] || ((status == 75)); then
    worker=$(sed -nE 's/^hosts? ([0-9, ]+) of.*/\1/p' <<<"$lost")
    echo "launch/tpu_pod.sh: worker ${worker:-?} of $name was lost (${lost:-exit 75}). Run this" \
      "command again to resume from the last checkpoint; exiting 75." >&2
    status=75
  fi
fi
if ((delete)); then
  run "${gcloud_tpu[@]}" delete "$name" "${where[@]}" --quiet
fi
exit "$status"
