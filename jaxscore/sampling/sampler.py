"""Jitted multi-turn sampler over a KV cache that carries across turns.

The state holds one token buffer per row: prompt, attempt 1, instruction, attempt 2, ...
laid out contiguously from slot 0, with the same slots in the KV cache. A turn is

  1. prefill: feed each row's tokens that the cache has not seen yet (the previous
     turn's last sampled token and the new message) at the row's own cache end,
     attending to the first `window` cached slots (a power of two >= the longest row's
     cache, at least `min_window`), not the whole buffer;
  2. decode: a `lax.while_loop` that samples a token per row, appends it, and feeds it,
     until every row hit a stop token, `max_new_tokens`, or the buffer's end. It runs
     in segments by cache-length bucket: attention reads only the first `window`
     slots (a power of two >= the longest live row, at least `min_window`), and a
     segment ends when a live row fills its window; the next one doubles it. So a step
     reads at most about twice the filled slots however long the buffer is. A segment
     also ends when at most half the rows are still live: those are then gathered into
     a batch half the size (or smaller), so finished rows stop costing work; every row
     is written back to its place when the turn ends.

So earlier turns are never prefilled again. Buffer sizes are fixed and prefill chunks,
attention windows and compacted row counts are power-of-two buckets: one compile per
bucket (a prefill per chunk and window), never more. Each row draws its tokens from its
own random stream (keyed by the row's index), so which rows share a compacted batch
never changes what a row samples.

  sampler = Sampler(cfg, max_len=512, stop_ids=[eos])
  state = sampler.start(prompts, rng)
  state = sampler.generate(params, state, SamplingConfig(max_new_tokens=128))
  state = sampler.add_message(state, instruction_ids)      # per-row token lists
  state = sampler.generate(params, state, SamplingConfig(max_new_tokens=128))
  episode = sampler.episode(state)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxscore.infra import sharding
from jaxscore.models import model as model_lib


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How one turn is sampled. temperature 0 is greedy."""

  temperature: float = 1.0
  top_k: int = 0  # 0: no top-k filter.
  top_p: float = 1.0  # 1.0: no nucleus filter.
  max_new_tokens: int = 256


@flax.struct.dataclass
class SamplerState:
  tokens_BxT: jax.Array  # int32 episode tokens, slots >= length are padding.
  logp_BxT: jax.Array  # float32 log pi(token) of sampled tokens, 0 elsewhere.
  turn_BxT: jax.Array  # int32: t for tokens sampled in turn t (1-based), 0 otherwise.
  length_B: jax.Array  # int32 tokens in the buffer.
  done_B: jax.Array  # bool: the row's current turn has ended.
  turn: jax.Array  # int32 turns sampled so far.
  cache: model_lib.Cache
  rng: jax.Array
  row_B: jax.Array  # int32 each row's index in the whole batch (its random stream).


@flax.struct.dataclass
class Episode:
  """What a trainer consumes: tokens and, per turn, which slots that turn sampled."""

  tokens_BxT: jax.Array
  logp_BxT: jax.Array
  turn_BxT: jax.Array
  length_B: jax.Array

  @property
  def sampled_BxT(self) -> jax.Array:
    """Sampled tokens of every turn (not the padding mask: prompts and messages are
    real tokens but not sampled)."""
    return self.turn_BxT > 0

  def response_ids(self, turn: int) -> list[list[int]]:
    """Token ids each row sampled in `turn` (1-based), on the host."""
    tokens, turns = sharding.to_host(self.tokens_BxT), sharding.to_host(self.turn_BxT)
    return [row[t == turn].tolist() for row, t in zip(tokens, turns)]


def bucket(n: int, minimum: int = 16) -> int:
  """Smallest power of two >= n (and >= minimum)."""
  size = minimum
  while size < n:
    size *= 2
  return size


def padded_chunks(items: Sequence, size: int):
  """(start, chunk, real) for consecutive chunks of `size` items, the last padded by
  repeating its last item: every call on a chunk has one shape (one compile), and its
  first `real` results are the items'."""
  for start in range(0, len(items), size):
    chunk = list(items[start:start + size])
    yield start, chunk + [chunk[-1]] * (size - len(chunk)), len(chunk)


def filter_logits(logits_BxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Masks logits outside the top-k and the top-p nucleus with -inf."""
  neg_inf = jnp.finfo(logits_BxV.dtype).min
  if top_k > 0:
    kth_B1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_B1, neg_inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep a token while the mass strictly before it is below top_p.
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff_B1 = jnp.min(jnp.where(before < top_p, sorted_BxV, jnp.inf), axis=-1,
                        keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_B1, neg_inf, logits_BxV)
  return logits_BxV


def sample_token(logits_BxV: jax.Array, rng: jax.Array, sampling: SamplingConfig,
                 row_B: jax.Array):
  """(token_B, log pi(token_B)) where log pi is the unfiltered model log-prob. Row b
  draws with `fold_in(rng, row_B[b])`."""
  logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
  if sampling.temperature == 0.0:
    token_B = jnp.argmax(logits_BxV, axis=-1)
  else:
    scaled = filter_logits(logits_BxV.astype(jnp.float32) / sampling.temperature,
                           sampling.top_k, sampling.top_p)
    draw = lambda row, logits_V: jax.random.categorical(jax.random.fold_in(rng, row), logits_V)
    token_B = jax.vmap(draw)(row_B, scaled)
  token_B = token_B.astype(jnp.int32)
  return token_B, jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0]


def _state_shardings(cfg: model_lib.ModelConfig, max_len: int,
                     batch_sharding: jax.sharding.NamedSharding, rules: sharding.Rules | None):
  """(SamplerState of shardings, logits sharding): rows as `batch_sharding` splits them,
  the cache by `rules`, scalars and the rng replicated."""
  mesh, rows = batch_sharding.mesh, batch_sharding.spec[0] if batch_sharding.spec else None
  rules = tuple(rules or ()) + (("cache_batch", rows),)  # The first match wins.
  at = lambda *spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  axes = model_lib.cache_axes()
  # Checks the cache's other dimensions (kv heads over `tensor`); rows are checked when
  # a batch arrives.
  b = math.prod(mesh.shape[a] for a in ((rows,) if isinstance(rows, str) else rows or ()))
  kv_shape = (cfg.num_layers, b, max_len, cfg.num_kv_heads, cfg.head_dim)
  sharding.check_divisible(model_lib.Cache(kv_shape, kv_shape, (b,)), axes, mesh, rules)
  state = SamplerState(
      tokens_BxT=at(rows, None), logp_BxT=at(rows, None), turn_BxT=at(rows, None),
      length_B=at(rows), done_B=at(rows), turn=at(), cache=sharding.shardings(axes, mesh, rules),
      rng=at(), row_B=at(rows))
  return state, at(rows, None)


class Sampler:
  """Compiled prefill and decode for one model config and buffer size."""

  def __init__(self, cfg: model_lib.ModelConfig, *, max_len: int,
               stop_ids: Sequence[int], end_of_turn_id: int | None = None,
               pad_id: int = 0, batch_sharding: jax.sharding.NamedSharding | None = None,
               rules: sharding.Rules | None = None, max_prompt_len: int | None = None,
               min_window: int = 64, min_compact_rows: int | None = 8):
    """
    Args:
      cfg: the model.
      max_len: slots per row for the whole episode (all turns).
      stop_ids: tokens that end a turn (EOS, the chat template's end of turn).
      end_of_turn_id: closes a reply that stopped at the length limit before the next
        message is added (chat formats); None for plain concatenation.
      pad_id: filler for unused slots.
      batch_sharding: how rows are split over devices. With several processes each
        passes only its own rows to `start` and `add_message`, in process order.
        Every piece of the state then keeps one sharding from call to call (rows
        split like this, the KV cache by `rules`), so no call compiles twice.
      rules: logical axis rules for the KV cache (e.g. kv heads over `tensor`);
        None splits only its rows.
      max_prompt_len: the longest prompt any row will have, if known; it sizes the
        first prefill identically on every process.
      min_window: the smallest decode window (cache slots attention reads); windows
        double up to `max_len`, one compile each. `max_len` reads the whole buffer
        every step (one compile).
      min_compact_rows: decode gathers the live rows into a smaller batch (a power of
        two, at least this many rows) once at most half the rows are live; one decode
        compile per (window, row count) reached. None never compacts (one decode
        compile per window). Compaction needs the row shards to be a power of two.
    """
    if not stop_ids:
      raise ValueError("stop_ids is empty: at least EOS is needed")
    self.cfg = cfg
    self.max_len = max_len
    self.stop_ids = tuple(int(i) for i in stop_ids)
    self.end_of_turn_id = end_of_turn_id
    self.pad_id = pad_id
    self.batch_sharding = batch_sharding
    self.max_prompt_len = max_prompt_len
    self.min_window = min_window
    self.min_compact_rows = min_compact_rows
    self.state_shardings = None
    logits_sharding = None
    if batch_sharding is not None:
      self.state_shardings, logits_sharding = _state_shardings(
          cfg, max_len, batch_sharding, rules)
    self._jit_pieces(logits_sharding)

  @classmethod
  def shared(cls, cfg: model_lib.ModelConfig, **kwargs) -> Sampler:
    """The one Sampler of this configuration in this process: callers that sample with
    the same model config and buffer (a study's arms, the evaluations before and after
    training, every test of a model) reuse its traced and compiled pieces instead of
    tracing them again. The logical axis rules active now are part of the key, since
    the pieces trace under them."""
    kwargs["stop_ids"] = tuple(int(i) for i in kwargs["stop_ids"])
    return _shared(cls, cfg, tuple(nn.get_logical_axis_rules()), tuple(sorted(kwargs.items())))

  def _jit_pieces(self, logits_sharding):
    """Compiles the pieces, with every output pinned to its input's sharding on a mesh."""
    pin = lambda *out: {} if self.state_shardings is None else {"out_shardings": out}
    state_out = {} if self.state_shardings is None else {"out_shardings": self.state_shardings}
    prefill_out = pin(self.state_shardings, logits_sharding)
    self._init = jax.jit(self._init_impl, **state_out)
    self._prefill = jax.jit(self._prefill_impl, static_argnames=("chunk", "window"),
                            donate_argnames=("state",), **prefill_out)
    self._decode = jax.jit(
        self._decode_impl, static_argnames=("sampling", "window"), donate_argnames=("state",),
        **pin(self.state_shardings, logits_sharding,
              None if self.state_shardings is None else self.state_shardings.turn))
    self._finish = jax.jit(self._finish_impl, donate_argnums=0, **state_out)
    self._append = jax.jit(self._append_impl, donate_argnames=("state",), **state_out)
    self._expand = jax.jit(self._expand_impl, static_argnames=("group_size",), **prefill_out)
    self._live = jax.jit(self._live_impl)
    self._unseen = jax.jit(self._unseen_impl)
    self._compact = jax.jit(self._compact_impl, static_argnames=("rows",),
                            donate_argnames=("full",),
                            **pin(self.state_shardings, self.state_shardings, logits_sharding))
    self._merge = jax.jit(self._merge_impl, donate_argnames=("full",), **state_out)

  @property
  def row_shards(self) -> int:
    """How many pieces the batch's rows are split into (the batch must divide)."""
    if self.batch_sharding is None or not self.batch_sharding.spec:
      return 1
    rows = self.batch_sharding.spec[0]
    axes = (rows,) if isinstance(rows, str) else (rows or ())
    return math.prod(self.batch_sharding.mesh.shape[a] for a in axes)

  # -- Host-side entry points. ----------------------------------------------

  def _rows(self, local: np.ndarray) -> jax.Array:
    """This process's rows -> the global batch array."""
    if self.batch_sharding is None:
      return jnp.asarray(local)
    global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    return jax.make_array_from_process_local_data(self.batch_sharding, local, global_shape)

  def start(self, prompts: Sequence[Sequence[int]], rng: jax.Array) -> SamplerState:
    """A fresh state holding each row's prompt (this process's rows)."""
    tokens = np.full((len(prompts), self.max_len), self.pad_id, np.int32)
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min() == 0:
      raise ValueError("empty prompt")
    if lengths.max() > self.max_len:
      raise ValueError(f"prompt of {lengths.max()} tokens exceeds max_len={self.max_len}")
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
    return self._init(self._rows(tokens), self._rows(lengths), rng)

  def generate(self, params: model_lib.Params, state: SamplerState,
               sampling: SamplingConfig, pending: int | None = None) -> SamplerState:
    """Samples one turn for every row.

    Args:
      pending: an upper bound on tokens per row the cache has not seen yet (the
        prompt on the first turn; 1 + the message later), which sizes the prefill's
        chunk; computed if None.
    """
    state, logits_BxV = self.prefill(params, state, pending)
    return self._decode_segments(params, state, logits_BxV, sampling)

  def prefill(self, params: model_lib.Params, state: SamplerState,
              pending: int | None = None) -> tuple[SamplerState, jax.Array]:
    """Feeds every row's unseen tokens (`generate`'s step 1): (state, each row's logits
    for its next token). One small device-to-host copy reads how much the cache holds,
    so that attention reads the filled window, not the whole buffer."""
    filled, unseen = (int(x) for x in self._unseen(state))
    return self._prefill(params, state, chunk=bucket(unseen if pending is None else pending),
                         window=self.window(filled))

  def window(self, filled: int) -> int:
    """The attention window (cached slots a prefill or decode step reads) for rows
    holding up to `filled` cached tokens."""
    return min(bucket(filled, self.min_window), self.max_len)

  def compacted_rows(self, rows: int) -> int | None:
    """The row count a batch of `rows` rows is compacted to once at most that many are
    live (None: it is not compacted)."""
    shards = self.row_shards
    if self.min_compact_rows is None or shards & (shards - 1):
      return None
    half = 1 << ((rows // 2).bit_length() - 1) if rows >= 2 else 0
    return half if half >= max(self.min_compact_rows, shards, 1) else None

  def _decode_segments(self, params, state: SamplerState, logits_BxV,
                       sampling: SamplingConfig) -> SamplerState:
    """Decodes the turn in segments (one sync each): a segment ends when a live row
    outgrows the window (the next doubles it) or when few enough rows are live to
    decode them in a smaller batch."""
    static = dataclasses.replace(sampling, max_new_tokens=0)
    max_new_tokens, step = jnp.int32(sampling.max_new_tokens), jnp.int32(0)
    full, part = state, None  # `part`: the batch being decoded, once compacted.
    filled, live = (int(x) for x in self._live(state))
    while live:
      current = full if part is None else part
      window, smaller = self.window(filled), self.compacted_rows(current.done_B.shape[0])
      if smaller is not None and live <= smaller:
        rows = max(bucket(live, 1), self.min_compact_rows, self.row_shards)
        full, part, logits_BxV = self._compact(full, part, logits_BxV, rows=rows)
        continue
      current, logits_BxV, step = self._decode(
          params, current, logits_BxV, step, max_new_tokens, jnp.int32(smaller or 0),
          sampling=static, window=window)
      full, part = (current, None) if part is None else (full, current)
      # The segment ended because the turn did (no live row left), a live row outgrew
      # the window, or few enough rows are live to compact them.
      filled, live = (int(x) for x in self._live(current))
    return self._finish(full if part is None else self._merge(full, part))

  def generate_grouped(self, params: model_lib.Params, state: SamplerState,
                       sampling: SamplingConfig, group_size: int,
                       pending: int | None = None) -> SamplerState:
    """Samples one turn for `group_size` rows per row of `state`, prefilling each row once.

    Row i's unseen tokens (its prompt, a shared prefix) are prefilled for row i alone;
    its cache and buffer are then copied to rows [i * group, (i + 1) * group) of the
    returned state, which decode independently. The result equals starting all those
    rows with the same tokens and calling `generate`, at 1/group of the prefill cost.
    """
    state, logits_BxV = self.prefill(params, state, pending)
    state, logits_BxV = self._expand(state, logits_BxV, group_size=group_size)
    return self._decode_segments(params, state, logits_BxV, sampling)

  def add_message(self, state: SamplerState, messages: Sequence[Sequence[int]],
                  active: Sequence[bool] | None = None) -> SamplerState:
    """Appends each row's next message (e.g. the instruction) after its last token
    (this process's rows).

    Rows with `active` False take no message and are finished: the next `generate`
    samples nothing for them, while the batch keeps its shape (no recompiles).
    """
    b = len(messages)
    active = np.ones((b,), bool) if active is None else np.asarray(active, bool)
    width = bucket(max([len(m) for m in messages] + [1]))
    msg = np.full((b, width), self.pad_id, np.int32)
    for i, m in enumerate(messages):
      msg[i, :len(m)] = m
    lengths = np.array([len(m) for m in messages], np.int32) * active
    return self._append(state, self._rows(msg), self._rows(lengths), self._rows(active))

  def episode(self, state: SamplerState) -> Episode:
    return Episode(tokens_BxT=state.tokens_BxT, logp_BxT=state.logp_BxT,
                   turn_BxT=state.turn_BxT, length_B=state.length_B)

  # -- Jitted pieces. -------------------------------------------------------

  def _init_impl(self, tokens_BxT, length_B, rng) -> SamplerState:
    b = tokens_BxT.shape[0]
    return SamplerState(
        tokens_BxT=tokens_BxT,
        logp_BxT=jnp.zeros((b, self.max_len), jnp.float32),
        turn_BxT=jnp.zeros((b, self.max_len), jnp.int32),
        length_B=length_B,
        done_B=jnp.zeros((b,), bool),
        turn=jnp.zeros((), jnp.int32),
        cache=model_lib.init_cache(self.cfg, b, self.max_len),
        rng=rng,
        row_B=jnp.arange(b, dtype=jnp.int32),
    )

  def _write(self, buf_BxT, values_BxM, start_B, count_B):
    """buf[b, start_b + j] = values[b, j] for j < count_b."""
    t = values_BxM.shape[1]
    slots_BxM = start_B[:, None] + jnp.arange(t)
    slots_BxM = jnp.where(jnp.arange(t) < count_B[:, None], slots_BxM, self.max_len)
    rows_BxM = jnp.broadcast_to(jnp.arange(buf_BxT.shape[0])[:, None], slots_BxM.shape)
    return buf_BxT.at[rows_BxM, slots_BxM].set(values_BxM.astype(buf_BxT.dtype), mode="drop")

  def _append_impl(self, state: SamplerState, msg_BxM, msg_len_B, active_B):
    last_B = jnp.take_along_axis(state.tokens_BxT, state.length_B[:, None] - 1, axis=1)[:, 0]
    ended_B = jnp.isin(last_B, jnp.asarray(self.stop_ids))
    tokens, length = state.tokens_BxT, state.length_B
    if self.end_of_turn_id is not None:
      # A reply cut at the length limit is closed before the next user turn.
      close_B = (~ended_B & active_B).astype(jnp.int32)
      eot_Bx1 = jnp.full((msg_BxM.shape[0], 1), self.end_of_turn_id, jnp.int32)
      tokens = self._write(tokens, eot_Bx1, length, close_B)
      length = jnp.minimum(length + close_B, self.max_len)
    tokens = self._write(tokens, msg_BxM, length, msg_len_B)
    length = jnp.minimum(length + msg_len_B, self.max_len)
    # A row with no room left cannot take another turn; an inactive row takes none.
    return state.replace(tokens_BxT=tokens, length_B=length,
                         done_B=(length >= self.max_len) | ~active_B)

  @staticmethod
  def _map_rows(fn, *states: SamplerState) -> SamplerState:
    """`fn(arrays, axis)` over the per-row fields of `states` (rows on `axis`); scalars
    are the first state's."""
    cache = lambda name: [getattr(s.cache, name) for s in states]
    field = lambda name: [getattr(s, name) for s in states]
    return states[0].replace(
        tokens_BxT=fn(field("tokens_BxT"), 0), logp_BxT=fn(field("logp_BxT"), 0),
        turn_BxT=fn(field("turn_BxT"), 0), length_B=fn(field("length_B"), 0),
        done_B=fn(field("done_B"), 0), row_B=fn(field("row_B"), 0),
        cache=model_lib.Cache(k_LxBxSxKxH=fn(cache("k_LxBxSxKxH"), 1),
                              v_LxBxSxKxH=fn(cache("v_LxBxSxKxH"), 1),
                              end_B=fn(cache("end_B"), 0)))

  def _expand_impl(self, state: SamplerState, logits_BxV, group_size: int):
    """Each row repeated `group_size` times, in place: B rows -> B * group_size rows."""
    state = self._map_rows(lambda xs, axis: jnp.repeat(xs[0], group_size, axis=axis), state)
    state = state.replace(row_B=jnp.arange(state.row_B.shape[0], dtype=jnp.int32))
    return state, jnp.repeat(logits_BxV, group_size, axis=0)

  def _merge_impl(self, full: SamplerState, part: SamplerState) -> SamplerState:
    """`full` with the compacted rows of `part` written back in their places."""
    def put(xs, axis):
      whole, rows = xs
      at = (slice(None),) * axis + (part.row_B,)
      return whole.at[at].set(rows)
    return self._map_rows(put, full, part)

  def _compact_impl(self, full: SamplerState, part: SamplerState | None, logits_BxV,
                    rows: int):
    """(full, the first `rows` rows of the current batch with its live rows first,
    their logits). `part`, the current batch if already compacted, is written back to
    `full` first, so no row is ever only in a dropped batch."""
    current = full if part is None else part
    if part is not None:
      full = self._merge_impl(full, part)
    # Stable: live rows keep their order; finished ones fill up to `rows` (they decode
    # nothing and are written back unchanged).
    order_R = jnp.argsort(current.done_B, stable=True)[:rows]
    taken = self._map_rows(lambda xs, axis: jnp.take(xs[0], order_R, axis=axis), current)
    return full, taken, logits_BxV[order_R]

  def _prefill_impl(self, params, state: SamplerState, chunk: int, window: int):
    end_B = state.cache.end_B
    count_B = state.length_B - end_B
    idx_BxC = jnp.minimum(end_B[:, None] + jnp.arange(chunk), self.max_len - 1)
    tokens_BxC = jnp.take_along_axis(state.tokens_BxT, idx_BxC, axis=1)
    mask_BxC = jnp.arange(chunk) < count_B[:, None]
    x_BxCxD, cache = model_lib.apply(params, tokens_BxC, self.cfg, mask_BxT=mask_BxC,
                                     cache=state.cache, attend_len=window, return_hidden=True)
    # Only each row's last position is sampled from: project that one to the vocabulary.
    last_B = jnp.maximum(count_B - 1, 0)
    x_Bx1xD = jnp.take_along_axis(x_BxCxD, last_B[:, None, None], axis=1)
    logits_BxV = model_lib.unembed(params, x_Bx1xD, self.cfg)[:, 0]
    return state.replace(cache=cache, turn=state.turn + 1), logits_BxV

  def _live_end_impl(self, state: SamplerState) -> jax.Array:
    """The longest cache among rows still sampling (0 if none)."""
    return jnp.max(jnp.where(state.done_B, 0, state.cache.end_B))

  def _unseen_impl(self, state: SamplerState) -> tuple[jax.Array, jax.Array]:
    """(the longest cache, the most tokens a row holds that its cache has not seen)."""
    return jnp.max(state.cache.end_B), jnp.max(state.length_B - state.cache.end_B)

  def _live_impl(self, state: SamplerState) -> tuple[jax.Array, jax.Array]:
    """(the longest live cache, how many rows are live)."""
    return self._live_end_impl(state), jnp.sum(~state.done_B)

  def _finish_impl(self, state: SamplerState) -> SamplerState:
    return state.replace(done_B=jnp.ones_like(state.done_B))

  def _decode_impl(self, params, state: SamplerState, logits_BxV, step, max_new_tokens,
                   min_live, sampling: SamplingConfig, window: int):
    """Decode steps while more than `min_live` rows are live (at least one) and every
    live row's cache fits in `window`.

    Returns (state, logits of the next token, steps taken in the turn so far).
    """
    stop_ids = jnp.asarray(self.stop_ids)
    turn_rng = jax.random.fold_in(state.rng, state.turn)

    def cond(carry):
      state, _, step = carry
      return ((step < max_new_tokens) & (jnp.sum(~state.done_B) > min_live)
              & ~jnp.all(state.done_B) & (self._live_end_impl(state) <= window))

    def body(carry):
      state, logits_BxV, step = carry
      token_B, logp_B = sample_token(logits_BxV, jax.random.fold_in(turn_rng, step), sampling,
                                     state.row_B)
      live_B = ~state.done_B
      write = lambda buf, v: self._write(buf, v[:, None], state.length_B,
                                         live_B.astype(jnp.int32))
      length_B = state.length_B + live_B
      done_B = (state.done_B | jnp.isin(token_B, stop_ids)
                | (step + 1 >= max_new_tokens) | (length_B >= self.max_len))
      state = state.replace(
          tokens_BxT=write(state.tokens_BxT, token_B),
          logp_BxT=write(state.logp_BxT, logp_B),
          turn_BxT=write(state.turn_BxT, jnp.broadcast_to(state.turn, token_B.shape)),
          length_B=length_B, done_B=done_B)
      # Feed the new token for rows that go on; a finished row's last token stays
      # pending and is prefilled with its next message.
      logits_Bx1xV, cache = model_lib.apply(params, token_B[:, None], self.cfg,
                                            mask_BxT=~done_B[:, None], cache=state.cache,
                                            attend_len=window)
      return state.replace(cache=cache), logits_Bx1xV[:, 0], step + 1

    state = state.replace(done_B=state.done_B | (state.length_B >= self.max_len))
    return jax.lax.while_loop(cond, body, (state, logits_BxV, step))


@functools.lru_cache(maxsize=32)
def _shared(cls, cfg, active_rules, kwargs) -> Sampler:
  del active_rules  # A key only: the pieces read the rules when they trace.
  return cls(cfg, **dict(kwargs))


def forget_shared() -> None:
  """Drops the shared samplers (`Sampler.shared`): the next caller traces and compiles
  afresh, e.g. to count what a run compiles."""
  _shared.cache_clear()
