"""The one config schema: every key a recipe may set, its default, and what it means.

Recipes in `configs/` call `base_config()` and override what they need, so the schema is
declared once. Command-line overrides use ml_collections: `--config.train.lr=3e-5`.
"""

import json

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds model init, data shuffling, dataset draws and the scorer.

  c.model = ml_collections.ConfigDict()
  c.model.preset = 'tiny'  # Named preset (mos_jax.models.PRESETS); ignored when hf_checkpoint is set.
  c.model.hf_checkpoint = ''  # Local Hugging Face folder (config.json + safetensors) to fine-tune.
  c.model.param_dtype = 'float32'  # Dtype the parameters are stored and updated in.
  c.model.dtype = 'float32'  # Compute dtype of activations ('bfloat16' on accelerators).
  c.model.remat = 'none'  # Per-layer recomputation in the backward pass: 'none', 'full', 'save_dots', 'save_dots_no_batch' (jax.checkpoint_policies).
  c.model.scan_layers = True  # Scan over stacked layers (compiles once per layer kind, not per layer).
  c.model.attention_impl = ''  # Attention kernel: '' (auto: splash on TPU, cudnn on GPU, xla elsewhere), 'xla', 'cudnn', 'triton', 'splash'.
  c.model.loss_chunk = 256  # Positions per LM-head + cross-entropy chunk: no full [B, L, V] fp32 logits (0 = one chunk).
  c.model.quantize = 'none'  # Frozen base storage: 'none', or 'int8' / 'int4' / 'nf4' through qwix (QLoRA; needs model.lora.rank > 0).
  c.model.vocab_size = 0  # Embedding rows of a preset: 0 = the tokenizer's size; more pads the table (as released checkpoints do), e.g. to bench a preset at its real size.
  c.model.lora = ml_collections.ConfigDict()
  c.model.lora.rank = 0  # LoRA rank through qwix (0 = off: full fine-tuning); adapters train, the base stays frozen.
  c.model.lora.alpha = 16.0  # LoRA scale numerator: the adapter output is multiplied by alpha / rank.
  c.model.lora.targets = '.*_proj'  # Regex (full match) over parameter paths 'layers/<i>/attn/{q,k,v,o}_proj', 'layers/<i>/mlp/{gate,up,down}_proj': the matched projections get adapters (e.g. '.*/[qv]_proj': q and v only).
  c.model.lora.dropout = 0.0  # Dropout rate on the adapters' input in training forwards (masks from (seed, step)); eval, rewards, generation and export are deterministic.

  c.data = ml_collections.ConfigDict()
  c.data.tokenizer = ''  # Local tokenizer folder; '' = the model.hf_checkpoint folder.
  c.data.template = ''  # '' = the tokenizer's chat template; or chatml, vicuna, llama3, gemma.
  c.data.max_len = 512  # Tokens per sequence (prompt + response).
  c.data.truncation = 'truncate'  # What to do with longer examples: 'truncate' or 'drop'.
  c.data.train_on_prompt = False  # True = loss on every token, not only assistant turns.
  c.data.packing = False  # Pack several examples per row (segment ids keep them apart).
  c.data.buckets = ()  # Pad to the smallest of these lengths that fits (empty = always max_len).
  c.data.num_workers = 0  # Grain worker processes per dataset pipeline (part of a run's identity).
  c.data.mix_per = 'batch'  # 'batch': one dataset per batch (Algorithm 1); 'example': per example.
  c.data.draws = 'random'  # 'random': independent draws from p (Algorithm 1); 'balanced': each dataset's draws stay within about one of their expected count (low-variance mixtures in short runs).
  c.data.on_error = 'raise'  # Malformed records: 'raise' (name file and line) or 'skip' (counted).
  c.data.reward_batch_size = 16  # Rows per dataset in each reward batch (examples; packed rows with data.packing).
  c.data.reward_micro_batch = 0  # Rows per forward in the reward and theta_0 passes (0 = all at once); must divide them.
  c.data.prefetch = 2  # Training batches prepared and put on the devices ahead, in a background thread (0 = inline).
  c.data.eval_batch_size = 16  # Examples per batch for dev-set evaluation.
  c.data.demo_dir = ''  # Where demo skills are generated when a recipe uses them ('' = none).
  c.data.root = ''  # Folder that relative dataset paths/dev_paths are read from ('' = as given).
  c.data.answer_field = 'answer'  # Record field with the exact answer (skills task exact match).
  # One entry per dataset: c.data.datasets.<name> = dataset(path=..., format=..., ...).
  c.data.datasets = ml_collections.ConfigDict()

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000  # Optimizer steps.
  c.train.epochs = 0.0  # > 0: steps = ceil(epochs * training rows per pass / batch_size) instead.
  c.train.batch_size = 64  # Global batch size in rows per optimizer step, all hosts (examples unless packed).
  c.train.micro_batches = 1  # Gradient accumulation: the batch is split into this many parts.
  c.train.lr = 1e-5  # Peak AdamW learning rate.
  c.train.warmup_fraction = 0.1  # Linear warm-up over this fraction of steps, then linear decay.
  c.train.weight_decay = 0.0  # AdamW weight decay.
  c.train.b1 = 0.9  # AdamW beta1.
  c.train.b2 = 0.999  # AdamW beta2.
  c.train.grad_clip = 1.0  # Global-norm gradient clipping (0 = off).
  c.train.max_bad_steps = 10  # Stop after this many non-finite updates in a row.
  c.train.log_every = 10  # Steps between metrics lines.
  c.train.eval_every = 100  # Steps between dev-set evaluations (0 = only at the start and end).
  c.train.eval_batches = 4  # Dev batches per dataset per evaluation (0 = the whole dev split).
  c.train.eval_tasks = ()  # Also run these at every evaluation: 'skills', cheap lm-eval tasks.
  c.train.eval_task_limit = 32  # Examples per eval task during training (0 = all).
  c.train.eval_task_path = ''  # Folder of extra lm-eval task YAMLs for eval_tasks ('' = none).
  c.train.checkpoint_every = 500  # Steps between checkpoints (0 = only at the end).
  c.train.keep_checkpoints = 3  # Checkpoints kept on disk.
  c.train.async_checkpoints = True  # Write checkpoints in the background.
  c.train.restore_fallback = False  # If the latest checkpoint is unreadable, set it aside and resume from an older one.
  c.train.compilation_cache = '~/.cache/mos_jax/jax'  # jax's persistent compilation cache folder ('' = off): repeated and resumed runs skip compiling.
  c.train.progress_bar = True  # Show a tqdm progress bar on process 0.

  c.mixing = ml_collections.ConfigDict()
  c.mixing.strategy = 'mos'  # 'static', 'mos', 'mospec', 'multidds', 'multiuat', 'odm', 'doremi', 'excess_theta0' or 'replay'.
  c.mixing.reward = 'diff'  # 'cossim' or 'diff'.
  c.mixing.ema = True  # MoS / MoSpec: smooth rewards with an EMA (Eq. 11).
  c.mixing.rival_ema = False  # MultiDDS / MultiUAT: the same EMA (off: their code has none).
  c.mixing.ema_alpha = 0.9  # Weight of the new reward in the EMA.
  c.mixing.update_every = 100  # Scorer update frequency S in optimizer steps.
  c.mixing.prior_temperature = float('inf')  # tau of Eq. 3: 1 proportional, 10, inf uniform.
  c.mixing.unit = 'example'  # What p counts: 'example' (the paper), 'token', or 'row' (a packed row; before 0.2).
  c.mixing.target = ''  # MoSpec: the dataset to specialise in.
  c.mixing.target_factor = 2.0  # MoSpec with DIFF: the target's reward is multiplied by this.
  c.mixing.scorer_hidden = 0  # Scorer MLP hidden size; 0 = one free logit per dataset.
  c.mixing.scorer_lr = 1e-4  # Adam learning rate of the scorer.
  c.mixing.inner_steps = 200  # Adam steps per scorer update (released code: 200).
  c.mixing.normalize_rewards = False  # Standardise rewards across datasets before the update.
  c.mixing.min_prob = 0.0  # Probability floor mixed into the scorer output (0 = off).
  c.mixing.diff_reference = 'cache'  # DIFF's theta_0: 'cache' (precomputed NLLs), 'device' (a copy of the initial parameters) or 'base' (LoRA: the frozen base with adapters off, no copy).
  c.mixing.reference_dtype = 'float32'  # Dtype of the on-device theta_0 copy.
  c.mixing.grad_params = ''  # MultiDDS: regex of the parameters whose gradients are compared ('' = all).
  c.mixing.uncertainty = 'entropy'  # MultiUAT: 'entropy' (mean predictive token entropy) or 'nll'.
  c.mixing.odm_alpha = 0.9  # ODM: smoothing of the importance-weighted loss reward.
  c.mixing.doremi_eta = 1.0  # DoReMi: step size of the exponentiated-gradient update.
  c.mixing.doremi_smoothing = 1e-3  # DoReMi: weight c of the uniform mixed into the weights.
  c.mixing.doremi = ml_collections.ConfigDict()
  c.mixing.doremi.reference = ''  # DoReMi: a finished run folder (e.g. the uni run of the same data and seed) whose final checkpoint is the reference model (strategy=excess_theta0: theta_0 instead).
  c.mixing.replay = ml_collections.ConfigDict()
  c.mixing.replay.run = ''  # strategy=replay: a run folder whose logged mixture (metrics.jsonl) this run follows step by step, rescaled to train.steps.
  c.mixing.static = ml_collections.ConfigDict()
  c.mixing.static.from_run = ''  # strategy=static: a run folder whose last logged mixture is held fixed ('' = q_tau).

  # Multi-host runs (one process per host): a lost or missing host ends the others with exit 75.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialization_timeout_s = 300  # Start-up waits this long for every process to join.
  c.distributed.heartbeat_timeout_s = 100  # A host silent this long is lost: the others stop (exit 75).
  c.distributed.shutdown_timeout_s = 300  # At the end, a process waits this long for the others to finish.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # Data-parallel axis size (-1 = the rest of the devices).
  c.mesh.fsdp = -1  # Fully sharded data-parallel axis size (-1 = the rest of the devices).
  c.mesh.tensor = 1  # Tensor (Megatron) parallel axis size.
  return c


def dataset(path: str, format: str = '', split: str = 'train', max_examples: int = 0,
            dev_examples: int = 1000, dev_path: str = '', sample: str = 'first',
            sample_seed: int = 0, test_examples: int = 0,
            test_path: str = '') -> ml_collections.ConfigDict:
  """One entry of `config.data.datasets`."""
  d = ml_collections.ConfigDict()
  d.path = path  # Local file/folder, save_to_disk folder, or hub id.
  d.format = format  # alpaca, sharegpt, messages, inputs_targets, prompt_response; '' = detect.
  d.split = split  # Split to read from a hub id or save_to_disk DatasetDict.
  d.max_examples = max_examples  # Cap on examples read (0 = all).
  d.sample = sample  # Which max_examples: 'first' records or a seeded 'random' sample.
  d.sample_seed = sample_seed  # Seed of sample='random' (mixed with the dataset name).
  d.dev_examples = dev_examples  # Examples held out of `path` for dev evaluation (paper: 1K).
  d.dev_path = dev_path  # Dev set file (same format); when set nothing is held out of `path`.
  # Held-out test split, never seen by training, strategies or checkpoint choice: its loss is
  # computed once, after the last step. 0 = none (compare then holds out as many as dev).
  d.test_examples = test_examples  # Distinct examples held out of `path` (apart from dev).
  d.test_path = test_path  # Test set file (same format); when set nothing more is held out.
  return d


def _json_safe(value):
  """inf/nan -> 'inf'/'nan' (strict JSON has no literal for them), tuples -> lists."""
  if isinstance(value, float) and value != value:
    return 'nan'
  if isinstance(value, float) and abs(value) == float('inf'):
    return 'inf' if value > 0 else '-inf'
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  return value


def config_to_json(config: ml_collections.ConfigDict) -> str:
  """Strict JSON text of a config (for `workdir/config.json` and checkpoint metadata)."""
  return json.dumps(_json_safe(config.to_dict()), indent=2, allow_nan=False)
