"""Text generation over a KV cache: a jitted prefill and a jitted decode loop, on the mesh.

  gen = Generator(model, tokenizer, mesh=mesh, template=template)
  gen.chat([[{'role': 'user', 'content': 'What is 2+3?'}]], max_new_tokens=64)  # -> ['5', ...]
  gen.generate(['Once upon a time'], max_new_tokens=32, sampling=Sampling(temperature=0.7))

Prompts of a batch are left-padded to a common length (rounded up to `PAD_MULTIPLE`, so few
shapes compile), rows are padded to a multiple of the batch-sharded devices, and the cache holds
prompt + max_new_tokens slots. The decode loop (`lax.while_loop`) stops at a stop token of every
row or after max_new_tokens; stop strings are checked on the host between chunks of
`stop_check_every` tokens and the text is cut at the first one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mos_jax.infra import sharding as sharding_lib
from mos_jax.data import templates as templates_lib
from mos_jax.models import kv_cache

# Prompt (and lm-eval scored) lengths are rounded up to a multiple of this: fewer compiled shapes.
PAD_MULTIPLE = 64


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen. temperature 0 = greedy (top_k / top_p ignored)."""
  temperature: float = 0.0
  top_k: int = 0  # Keep the k most likely tokens (0 = all).
  top_p: float = 1.0  # Keep the smallest set of tokens with this much probability (1 = all).


def sample(logits, key, sampling: Sampling):
  """logits [B, V] float32 -> token ids [B] int32."""
  if sampling.temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_k > 0:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    cutoff = jnp.min(jnp.where(before < sampling.top_p, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class DecodeState(NamedTuple):
  cache: kv_cache.KVCache
  logits: jax.Array  # [B, V] float32: the next token's distribution
  tokens: jax.Array  # [B, T] int32: generated so far (pad after a row is done)
  count: jax.Array  # [] int32: tokens generated so far
  done: jax.Array  # [B] bool
  key: jax.Array


def prefill(params, tokens, attention_mask, key, *, graphdef, cache_len: int, max_new: int,
            pad_id: int):
  """Runs the prompts [B, P] (left-padded) into a fresh cache; returns the DecodeState."""
  model = nnx.merge(graphdef, params)
  batch = tokens.shape[0]
  cache = kv_cache.init(model.config, batch, cache_len)
  out = model(tokens, attention_mask=attention_mask, cache=cache)
  return DecodeState(cache=out.cache, logits=out.logits[:, -1], count=jnp.zeros((), jnp.int32),
                     tokens=jnp.full((batch, max_new), pad_id, jnp.int32),
                     done=~attention_mask.astype(bool).any(axis=1), key=key)


def decode(params, state: DecodeState, limit, *, graphdef, sampling: Sampling,
           stop_ids: tuple[int, ...], pad_id: int):
  """Generates up to `limit` more tokens (and never past [B, T]), stopping early once every row
  has produced a stop token. `limit` is traced: one compile serves every chunk size."""
  max_new = state.tokens.shape[1]
  stop = jnp.asarray(stop_ids or (-1,), jnp.int32)
  end = jnp.minimum(state.count + limit, max_new)

  # The parameters ride in the loop carry: NNX transforms inside the model (the layer scan) need
  # them at the loop body's trace level.
  def cond(carry):
    s = carry[1]
    return (s.count < end) & ~jnp.all(s.done)

  def body(carry):
    params, s = carry
    token = sample(s.logits, jax.random.fold_in(s.key, s.count), sampling)  # [B]
    token = jnp.where(s.done, pad_id, token)
    tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], s.count, axis=1)
    done = s.done | jnp.isin(token, stop)
    out = nnx.merge(graphdef, params)(token[:, None], cache=s.cache)
    return params, DecodeState(cache=out.cache, logits=out.logits[:, -1], tokens=tokens,
                               count=s.count + 1, done=done, key=s.key)

  return jax.lax.while_loop(cond, body, (params, state))[1]


def round_up(n: int, multiple: int) -> int:
  """The padding rule of every batch the sampler and the lm-eval model build."""
  return -(-n // multiple) * multiple


class Generator:
  """Batched generation with one model and tokenizer; jitted functions are cached per shape."""

  def __init__(self, model, tokenizer, mesh: jax.sharding.Mesh | None = None, template=None,
               stop_ids: Sequence[int] | None = None):
    self.tokenizer = tokenizer
    self.mesh = mesh
    self.template = template
    self.config = model.config
    self.graphdef, self.params = nnx.split(model)
    pad = tokenizer.pad_token_id
    self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))
    if stop_ids is None:
      stop_ids = default_stop_ids(tokenizer, model.config, chat=template is not None)
    self.stop_ids = tuple(sorted(set(int(i) for i in stop_ids)))
    self._prefill = {}
    self._decode = {}

  @property
  def batch_multiple(self) -> int:
    return 1 if self.mesh is None else self.mesh.shape['data'] * self.mesh.shape['fsdp']

  def _jitted(self, cache_len: int, max_new: int, sampling: Sampling):
    key = (cache_len, max_new)
    if key not in self._prefill:
      self._prefill[key] = jax.jit(functools.partial(
          prefill, graphdef=self.graphdef, cache_len=cache_len, max_new=max_new,
          pad_id=self.pad_id))
    if sampling not in self._decode:
      self._decode[sampling] = jax.jit(functools.partial(
          decode, graphdef=self.graphdef, sampling=sampling, stop_ids=self.stop_ids,
          pad_id=self.pad_id), donate_argnums=(1,))
    return self._prefill[key], self._decode[sampling]

  def put_batch(self, x):
    """Every process holds the whole batch; each device takes its rows (works multi-host)."""
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding_lib.batch_sharding(self.mesh, x.ndim),
                                        lambda index: x[index])

  def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   sampling: Sampling = Sampling(), seed: int = 0,
                   stop: Sequence[str] = (), stop_check_every: int = 32) -> list[list[int]]:
    """Token ids of each prompt's continuation, without the stop token.

    `stop` strings end a row once its decoded text contains one (checked every `stop_check_every`
    tokens, so the ids may run a little past it; `generate` cuts the text at the string itself).
    """
    if not prompts:
      return []
    if max_new_tokens <= 0:
      return [[] for _ in prompts]
    n = len(prompts)
    rows = round_up(n, self.batch_multiple)
    length = round_up(max(max(len(p) for p in prompts), 1), PAD_MULTIPLE)
    tokens = np.full((rows, length), self.pad_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    for i, p in enumerate(prompts):
      if len(p):
        tokens[i, length - len(p):] = p
        mask[i, length - len(p):] = 1
    prefill_fn, decode_fn = self._jitted(length + max_new_tokens, max_new_tokens, sampling)
    ctx = jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()
    with ctx:
      state = prefill_fn(self.params, self.put_batch(tokens), self.put_batch(mask),
                         jax.random.key(seed))
      chunk = stop_check_every if stop else max_new_tokens
      stopped = np.zeros(rows, bool)
      while True:
        state = decode_fn(self.params, state, jnp.asarray(chunk, jnp.int32))
        count = int(host_value(state.count))
        done = host_value(state.done)
        if stop:
          out = host_value(state.tokens)[:, :count]
          for i in range(n):
            if not done[i] and any(s in self._decode_text(out[i]) for s in stop):
              stopped[i] = True
          if stopped.any():
            done = done | stopped
            state = state._replace(done=self.put_batch(done))
        if count >= max_new_tokens or done.all():
          break
      out = host_value(state.tokens)[:n, :count]
    result = []
    stops = set(self.stop_ids)
    for row in out:
      ids = row.tolist()
      cut = next((k for k, t in enumerate(ids) if t in stops), len(ids))
      result.append(ids[:cut])
    return result

  def _decode_text(self, ids) -> str:
    stops = set(self.stop_ids)
    ids = list(ids)
    cut = next((k for k, t in enumerate(ids) if t in stops), len(ids))
    return self.tokenizer.decode(ids[:cut], skip_special_tokens=True)

  def generate(self, prompts: Sequence[str], max_new_tokens: int, sampling: Sampling = Sampling(),
               seed: int = 0, stop: Sequence[str] = (), batch_size: int = 0) -> list[str]:
    """Continuations of raw text prompts (tokenized as they are, no special tokens added)."""
    ids = [self.tokenizer(p, add_special_tokens=False)['input_ids'] for p in prompts]
    step = batch_size or len(ids) or 1
    texts = []
    for lo in range(0, len(ids), step):
      out = self.generate_ids(ids[lo:lo + step], max_new_tokens, sampling, seed + lo, stop)
      texts.extend(cut_at_stop(self.tokenizer.decode(o, skip_special_tokens=True), stop)
                   for o in out)
    return texts

  def chat_prompt(self, messages: Sequence[dict]) -> str:
    if self.template is None:
      raise ValueError('this generator has no chat template')
    return templates_lib.generation_prompt(self.template, messages)

  def chat(self, conversations: Sequence[Sequence[dict]], max_new_tokens: int,
           sampling: Sampling = Sampling(), seed: int = 0, stop: Sequence[str] = (),
           batch_size: int = 0) -> list[str]:
    """The next assistant turn of each conversation, rendered with the run's chat template."""
    return self.generate([self.chat_prompt(c) for c in conversations], max_new_tokens, sampling,
                         seed, stop, batch_size)


def host_value(x) -> np.ndarray:
  """A (possibly sharded, multi-host) array as a numpy array on every process."""
  if jax.process_count() > 1 and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
  """Text up to the first occurrence of any stop string."""
  for s in stop:
    if s:
      text = text.split(s, 1)[0]
  return text


def default_stop_ids(tokenizer, model_config, chat: bool) -> list[int]:
  """EOS of the tokenizer and the model; for chat, also the template's end-of-turn tokens."""
  ids = set()
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  eos = model_config.eos_token_id
  ids.update((eos,) if isinstance(eos, int) else (eos or ()))
  if chat:
    ids.update(tokenizer.convert_tokens_to_ids(templates_lib.turn_closers(tokenizer)))
  return sorted(i for i in ids if i is not None and 0 <= i < model_config.vocab_size)

