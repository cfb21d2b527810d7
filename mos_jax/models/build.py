"""The run's model from its config: a Hugging Face checkpoint or a preset, with LoRA adapters.

One builder for training, inference, selection and the benchmark, so a preset's embedding rows
and the model options mean the same everywhere.
"""

from __future__ import annotations

from mos_jax.models import lora
from mos_jax.models.decoder import init_model
from mos_jax.models.hf_io import load_hf
from mos_jax.models.presets import get_preset


def embedding_rows(model_config, tokenizer_size: int) -> int:
  """Rows of a preset's embedding table: `model.vocab_size`, or (0, or a run config from before
  the key) the tokenizer's size."""
  return model_config.get('vocab_size', 0) or tokenizer_size


def build_model(config, mesh, vocab_size: int, adapters: bool = True):
  """The run's model on `mesh` (None: default device): `model.hf_checkpoint` or the preset with
  `vocab_size` embeddings, with qwix adapters when `model.lora.rank` > 0 (and `adapters`)."""
  m = config.model
  lora.check_config(config)
  options = {'dtype': m.dtype, 'param_dtype': m.param_dtype, 'remat': m.remat,
             'scan_layers': m.scan_layers, 'attention_impl': m.attention_impl or None,
             'loss_chunk': m.loss_chunk}
  if m.hf_checkpoint:
    model = load_hf(m.hf_checkpoint, mesh=mesh, **options)
  else:
    rows = embedding_rows(m, vocab_size)
    model = init_model(get_preset(m.preset, vocab_size=rows, **options), config.seed, mesh=mesh)
  if model.config.vocab_size < vocab_size:
    raise ValueError(f'The tokenizer has {vocab_size} tokens but the model only '
                     f'{model.config.vocab_size} embeddings (model.hf_checkpoint / '
                     f'model.vocab_size).')
  if adapters and lora.enabled(m):  # qwix adapters (and a quantized base with model.quantize).
    model = lora.add_adapters(model, m.lora, m.quantize, config.seed)
  return model
