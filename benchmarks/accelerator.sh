#!/usr/bin/env bash
# The accelerator measurements the README leaves open, in one run (~10 minutes on one H100/H200):
#   1. `python -m mos_jax.bench` for Qwen1.5-0.5B and Gemma-2B at their real sizes (random weights,
#      bf16 compute, packed demo data at 2048 tokens, scanned layers, auto attention kernel): MFU,
#      tokens/s, memory.
#   2. KV-cache decode tokens/s for Qwen1.5-0.5B (benchmarks/bench_decode.py).
#   3. LoRA r=16 train step on Llama-3-8B on one device (benchmarks/bench_lora_step.py): tokens/s.
#
#   bash benchmarks/accelerator.sh [OUT_DIR]      # OUT_DIR defaults to $OUT, else runs/accelerator
#   SMALL=1 bash benchmarks/accelerator.sh DIR    # the same commands on the tiny preset (a CPU check)
#
# Each step writes its JSON / output into OUT_DIR; a failing step is recorded there and the
# script goes on, so one run brings back everything that worked.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/accelerator}}"
mkdir -p "$out"
if [[ -n "${SMALL:-}" ]]; then
  presets=(tiny); vocab=(512); lora_preset=tiny; seq=128; batch=4; decode_batches=1; windows=1
else
  # The presets' own vocabularies (the demo tokenizer has 512 tokens: model.vocab_size pads the
  # table to the real model's size, whose LM head is a large share of the FLOPs).
  presets=(qwen1.5-0.5b gemma-2b); vocab=(151936 256000); lora_preset=llama-3-8b; seq=2048
  batch=8; decode_batches=1,32; windows=2
fi

step() {  # step NAME COMMAND...: runs it, keeps its output and exit status in OUT_DIR.
  local name="$1"; shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$out/summary.txt"
  tail -n 25 "$out/$name.log"
}

python -c 'import jax; print(jax.devices())' | tee "$out/devices.txt"
for i in "${!presets[@]}"; do
  preset="${presets[$i]}"
  step "bench_$preset" python -m mos_jax.bench --config configs/demo.py \
    --config.model.preset="$preset" --config.model.vocab_size="${vocab[$i]}" \
    --config.model.dtype=bfloat16 \
    --config.model.param_dtype=float32 --config.model.remat=save_dots \
    --config.data.max_len="$seq" --config.train.batch_size="$batch" \
    --config.data.reward_batch_size=4 --config.mixing.update_every=10 \
    --config.mixing.diff_reference=cache --config.train.eval_every=0 \
    --windows "$windows" --repeats 1 --json "$out/bench_$preset.json"
done
step decode python benchmarks/bench_decode.py --preset "${presets[0]}" --dtype bfloat16 \
  --batches "$decode_batches" --skip_recompute --skip_mmlu
step lora_step python benchmarks/bench_lora_step.py --preset "$lora_preset" --rank 16 \
  --batch 1 --seq "$seq" --rounds 2 --steps 3 --only lora --dtype bfloat16
cat "$out/summary.txt"
