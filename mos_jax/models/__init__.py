"""The decoder backbone (Llama / Qwen2 / Qwen3 / Mistral / Gemma 1-3), its presets, and HF
checkpoint import/export."""

from mos_jax.models.config import ModelConfig
from mos_jax.models.decoder import Decoder, DecoderOutput, init_model
from mos_jax.models.hf_io import (CheckpointError, SUPPORTED_MODEL_TYPES, config_from_hf,
                                  config_to_hf, load_hf, save_hf)
from mos_jax.models.presets import PRESETS, get_preset, param_count
from mos_jax.models.safetensors_file import SafetensorsError

__all__ = ['ModelConfig', 'Decoder', 'DecoderOutput', 'init_model', 'PRESETS', 'get_preset',
           'param_count', 'load_hf', 'save_hf', 'config_from_hf', 'config_to_hf',
           'CheckpointError', 'SafetensorsError', 'SUPPORTED_MODEL_TYPES']
