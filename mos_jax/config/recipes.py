"""The paper's experimental settings (§4.1, Table 1), shared by the recipe files in `configs/`.

Recipe files are loaded by path (ml_collections), so the shared part lives here, importable from
any of them. `paper_config('llama', 'cossim')` is MoS + COSSIM + EMA on Llama-3-8B with the four
datasets of §4.1.
"""

import math

import ml_collections

from mos_jax.config import base_config, dataset

# Local Hugging Face folders; download once with e.g.
#   huggingface-cli download Qwen/Qwen1.5-0.5B --local-dir /path/to/Qwen1.5-0.5B
# (Gemma and Llama 3 are gated: accept the licence on the hub and `huggingface-cli login` first).
MODELS = {
    'qwen': dict(hf_checkpoint='/path/to/Qwen1.5-0.5B', hub_id='Qwen/Qwen1.5-0.5B',
                 template='chatml'),
    'gemma': dict(hf_checkpoint='/path/to/gemma-2b', hub_id='google/gemma-2b',
                  template='gemma'),
    'llama': dict(hf_checkpoint='/path/to/Meta-Llama-3-8B', hub_id='meta-llama/Meta-Llama-3-8B',
                  template='llama3'),
    # The newer families (not in the paper; its §4.1 hyper-parameters unchanged).
    'qwen3': dict(hf_checkpoint='/path/to/Qwen3-8B-Base', hub_id='Qwen/Qwen3-8B-Base',
                  template='chatml'),
    # google/gemma-3-4b-pt is multimodal (Gemma3ForConditionalGeneration), which load_hf
    # refuses: point this at its text model saved as Gemma3ForCausalLM (docs/models.md).
    'gemma3': dict(hf_checkpoint='/path/to/gemma-3-4b-pt-text', hub_id='google/gemma-3-4b-pt',
                   template='gemma'),
    'mistral': dict(hf_checkpoint='/path/to/Mistral-7B-v0.3', hub_id='mistralai/Mistral-7B-v0.3',
                    template='vicuna'),
}

# Table 1: training examples per dataset after the paper's random 10% sample.
PAPER_SIZES = {'math': 26_200, 'medicine': 5_200, 'general': 9_300, 'nlp': 62_600}
PAPER_EPOCHS = 3
# Where `python -m mos_jax.data.prepare paper --out DIR` wrote the data (relative to the working
# directory); change it with --config.data.root=DIR.
PAPER_DATA_ROOT = 'data/paper'
PAPER_BATCH = 64  # §4.1: examples per step (and per dataset in a reward batch).
# The recipes pack examples into 2048-token rows, so their batches count rows: Table 1's 22.3M words
# over 103.3K examples are about 290 tokens per example with the chat template, about 7 per row, so
# 8 rows hold about §4.1's 64 examples, and 3 epochs of examples (train.epochs counts mixing.unit,
# 'example') take about the paper's 4843 steps with its 100-step scorer cadence (64 rows would
# hold ~450 examples and give ~7x fewer steps and updates). The loader draws a dataset's rows with
# p_i / (its examples per row), so each dataset's share of examples, not of rows, is p.
# `python -m mos_jax.data.inspect` prints the examples per packed row of the prepared data.
PAPER_PACKED_ROWS = 8


def paper_steps(sizes=PAPER_SIZES, epochs: int = PAPER_EPOCHS, batch: int = PAPER_BATCH) -> int:
  """Steps for `epochs` passes over all datasets: 3 * 103.3K / 64 -> 4843 for Table 1."""
  return math.ceil(epochs * sum(sizes.values()) / batch)


def paper_datasets() -> ml_collections.ConfigDict:
  """The four SFT datasets of §4.1 as written by `python -m mos_jax.data.prepare paper`.

  Paths are relative to `data.root` (PAPER_DATA_ROOT unless overridden): <name>/train.jsonl is the
  seeded random 10% of the dataset (P3: of 1K random examples per subset), <name>/dev.jsonl the 1K
  dev examples drawn outside it and <name>/test.jsonl 1K test examples outside both, so nothing is
  held out of the training file.
  """
  d = ml_collections.ConfigDict()
  for name in PAPER_SIZES:  # math: MathInstruct, medicine: MedInstruct, general: ShareGPT, nlp: P3.
    d[name] = dataset(f'{name}/train.jsonl', format='messages', dev_path=f'{name}/dev.jsonl',
                      test_path=f'{name}/test.jsonl')
  return d


def paper_config(model: str, reward: str = 'cossim', strategy: str = 'mos',
                 target: str = '') -> ml_collections.ConfigDict:
  """§4.1 settings for `model` in MODELS with MoS (or MoSpec) and `reward` ('cossim'/'diff')."""
  spec = MODELS[model]
  c = base_config()
  c.model.hf_checkpoint = spec['hf_checkpoint']  # Local copy of spec['hub_id'] (see MODELS).
  c.model.dtype = 'bfloat16'  # Accelerator compute dtype; parameters and AdamW stay float32.
  # Qwen keeps the projections' outputs (recomputes attention and elementwise ops); Gemma-2B and
  # Llama-3-8B recompute whole layers (README "Memory per device").
  c.model.remat = 'save_dots_no_batch' if model == 'qwen' else 'full'
  c.model.scan_layers = True  # One compiled layer body, scanned.
  c.data.template = spec['template']  # Base checkpoints ship no chat template: use the family's.
  c.data.max_len = 2048  # Not stated in the paper; fits most multi-turn ShareGPT conversations.
  # About 64 examples per dataset for the scorer update (§4.1 "batch size of 64"), packed in 8 rows;
  # the released code uses 16 examples for DIFF (--config.data.reward_batch_size=2 to match it).
  c.data.reward_batch_size = PAPER_PACKED_ROWS
  c.data.root = PAPER_DATA_ROOT  # The prepared folder (python -m mos_jax.data.prepare paper).
  c.data.reward_micro_batch = 16  # 32 reward rows (and theta_0 batches of 16) in forwards of 16.
  c.data.packing = True  # SFT examples are mostly far shorter than 2048 tokens: pack them.
  c.data.datasets = paper_datasets()  # MathInstruct, MedInstruct, ShareGPT, P3 (Table 1).
  c.train.epochs = PAPER_EPOCHS  # §4.1: 3 epochs; steps follow from the prepared sizes at start.
  c.train.steps = paper_steps()  # Used only with epochs=0: 3 epochs of Table 1's 103.3K at 64.
  c.train.batch_size = PAPER_PACKED_ROWS  # Rows of ~7 packed examples: about §4.1's 64 examples.
  c.train.lr = 1e-5  # §4.1 AdamW peak learning rate.
  c.train.warmup_fraction = 0.1  # §4.1: linear schedule, warm-up over 10% of the steps.
  c.mixing.strategy = strategy  # 'mos' (Table 2) or 'mospec' (§5.5).
  c.mixing.reward = reward  # COSSIM or DIFF (§3.2).
  c.mixing.ema = True  # The best Table 2 rows use EMA with beta = 0.9 (Eq. 11).
  c.mixing.update_every = 100  # §4.1: psi updated every 100 steps (released code: 200).
  c.mixing.scorer_lr = 1e-4  # §4.1.
  c.mixing.prior_temperature = float('inf')  # §4.1: psi initialised by tau = inf (uniform).
  c.mixing.target = target  # MoSpec's specialised dataset ('' for MoS).
  return c


def variants() -> tuple[str, ...]:
  """The `:model-reward` suffixes accepted by configs/paper.py."""
  return tuple(f'{m}-{r}' for m in MODELS for r in ('cossim', 'diff'))


def paper_config_from_arg(arg: str) -> ml_collections.ConfigDict:
  """'llama-diff' -> paper_config('llama', 'diff')."""
  if arg not in variants():
    raise ValueError(f'Unknown paper recipe {arg!r}; choose one of {", ".join(variants())}.')
  model, reward = arg.split('-')
  return paper_config(model, reward)
