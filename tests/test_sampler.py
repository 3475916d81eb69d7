"""Sampler: transformers parity, multi-turn on the carried cache, log-probs, retracing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_torch
from hf_tiny import make_hf_model

from jaxscore.models import hf_checkpoint
from jaxscore.models import model as model_lib
from jaxscore.sampling import sampler as sampler_lib

GREEDY = sampler_lib.SamplingConfig(temperature=0.0, max_new_tokens=8)
EOS, EOT = 100, 99
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]


@pytest.fixture(scope="module")
def tiny():
  cfg = model_lib.ModelConfig(vocab_size=101, num_layers=2, embed_dim=32, num_heads=4,
                              num_kv_heads=2, mlp_dim=48)
  return cfg, model_lib.init(cfg, jax.random.key(0), stddev=0.3)


def _greedy_from_scratch(cfg, params, ids, n, width=64):
  """Reference: re-run the full forward on the growing sequence, no cache. The sequence
  is right-padded to `width` (one compile): causal attention keeps padding after the
  last token from changing its logits."""
  forward = jax.jit(lambda p, t: model_lib.apply(p, t, cfg)[0])
  ids = list(ids)
  for _ in range(n):
    logits = forward(params, jnp.array([ids + [0] * (width - len(ids))]))
    ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
  return ids


def test_greedy_matches_transformers_generate(tmp_path):
  torch = require_torch()
  hf = make_hf_model("qwen2")
  hf.save_pretrained(tmp_path)
  cfg, params = hf_checkpoint.load_hf(tmp_path)
  smp = sampler_lib.Sampler(cfg, max_len=48, stop_ids=[EOS])
  state = smp.generate(params, smp.start(PROMPTS, jax.random.key(0)),
                       sampler_lib.SamplingConfig(temperature=0.0, max_new_tokens=12))
  ours = smp.episode(state).response_ids(1)
  for row, prompt in enumerate(PROMPTS):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                      eos_token_id=EOS, pad_token_id=0)
    assert ours[row] == out[0, len(prompt):].tolist()


def test_two_turns_on_carried_cache_equal_sampling_from_scratch(tiny):
  cfg, params = tiny
  instruction = [[40, 41, 42], [43, 44], [45]]
  smp = sampler_lib.Sampler(cfg, max_len=64, stop_ids=[EOS], end_of_turn_id=EOT)
  state = smp.generate(params, smp.start(PROMPTS, jax.random.key(0)), GREEDY)
  state = smp.add_message(state, instruction)
  state = smp.generate(params, state, GREEDY)
  state = smp.add_message(state, [[50, 51]] * 3)
  state = smp.generate(params, state, GREEDY)
  ep = smp.episode(state)
  tokens, lengths = np.asarray(ep.tokens_BxT), np.asarray(ep.length_B)
  # A reply cut at the length limit is closed with EOT; one that stopped is not.
  close = lambda y: y + ([] if y[-1] == EOS else [EOT])
  cut = 0
  for row, prompt in enumerate(PROMPTS):
    y1, y2, y3 = (ep.response_ids(t)[row] for t in (1, 2, 3))
    cut += sum(y[-1] != EOS for y in (y1, y2))
    expected = prompt + close(y1) + instruction[row] + close(y2) + [50, 51] + y3
    assert tokens[row, :lengths[row]].tolist() == expected
    ctx = prompt + close(y1) + instruction[row]
    assert _greedy_from_scratch(cfg, params, ctx, 8)[len(ctx):len(ctx) + len(y2)] == y2
    ctx = ctx + close(y2) + [50, 51]
    assert _greedy_from_scratch(cfg, params, ctx, 8)[len(ctx):len(ctx) + len(y3)] == y3
  assert cut > 0


def test_stop_token_ends_the_turn_and_stays_in_the_response(tiny):
  cfg, params = tiny
  smp = sampler_lib.Sampler(cfg, max_len=64, stop_ids=[EOS])
  free = smp.episode(smp.generate(params, smp.start(PROMPTS, jax.random.key(0)), GREEDY))
  # Make the third greedy token of row 0 a stop token.
  stop = free.response_ids(1)[0][2]
  smp = sampler_lib.Sampler(cfg, max_len=64, stop_ids=[EOS, stop], end_of_turn_id=stop)
  state = smp.generate(params, smp.start(PROMPTS, jax.random.key(0)), GREEDY)
  ep = smp.episode(state)
  y1 = ep.response_ids(1)[0]
  assert y1 == free.response_ids(1)[0][:y1.index(stop) + 1] and y1[-1] == stop
  # A row that stopped on its own gets no extra end-of-turn token.
  state = smp.add_message(state, [[60]] * 3)
  n = int(state.length_B[0])
  assert np.asarray(state.tokens_BxT)[0, n - 2:n].tolist() == [stop, 60]


def test_sampled_logprobs_equal_teacher_forced_logprobs(tiny):
  cfg, params = tiny
  smp = sampler_lib.Sampler(cfg, max_len=64, stop_ids=[EOS], end_of_turn_id=EOT)
  sampling = sampler_lib.SamplingConfig(temperature=1.0, max_new_tokens=10)
  state = smp.generate(params, smp.start(PROMPTS, jax.random.key(1)), sampling)
  state = smp.generate(params, smp.add_message(state, [[7, 8]] * 3), sampling)
  ep = smp.episode(state)
  mask = jnp.arange(64)[None] < ep.length_B[:, None]
  logits, _ = model_lib.apply(params, ep.tokens_BxT, cfg, mask_BxT=mask)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  teacher = jnp.take_along_axis(logp, ep.tokens_BxT[:, 1:, None], axis=-1)[..., 0]
  sampled = ep.sampled_BxT[:, 1:]
  assert int(sampled.sum()) > 30
  np.testing.assert_allclose(np.where(sampled, ep.logp_BxT[:, 1:], 0),
                             np.where(sampled, teacher, 0), atol=1e-4)


def test_each_row_of_a_ragged_batch_equals_running_it_alone(tiny):
  cfg, params = tiny
  smp = sampler_lib.Sampler(cfg, max_len=64, stop_ids=[EOS], end_of_turn_id=EOT)

  def run(prompts, messages):
    state = smp.generate(params, smp.start(prompts, jax.random.key(0)), GREEDY)
    state = smp.generate(params, smp.add_message(state, messages), GREEDY)
    ep = smp.episode(state)
    return [np.asarray(ep.tokens_BxT)[i, :int(ep.length_B[i])].tolist()
            for i in range(len(prompts))]

  messages = [[40, 41, 42, 43, 44, 45], [43], [45, 46]]
  together = run(PROMPTS, messages)
  for row in range(3):
    assert run([PROMPTS[row]], [messages[row]])[0] == together[row]


def test_callers_with_one_configuration_share_one_sampler(tiny):
  from jaxscore.infra import sharding

  cfg, params = tiny
  smp = sampler_lib.Sampler.shared(cfg, max_len=64, stop_ids=[EOS], end_of_turn_id=EOT)
  assert sampler_lib.Sampler.shared(cfg, max_len=64, stop_ids=(EOS,), end_of_turn_id=EOT) \
      is smp
  state = smp.generate(params, smp.start(PROMPTS, jax.random.key(0)),
                       sampler_lib.SamplingConfig(max_new_tokens=4))
  again = sampler_lib.Sampler.shared(cfg, end_of_turn_id=EOT, stop_ids=[EOS], max_len=64)
  compiled = again._decode._cache_size()
  again.generate(params, again.start(PROMPTS, jax.random.key(1)),
                 sampler_lib.SamplingConfig(max_new_tokens=4))
  assert compiled >= 1 and again._decode._cache_size() == compiled  # Nothing traced again.
  assert state.tokens_BxT.shape[1] == 64
  # Another buffer, another model or other active logical rules: another sampler.
  assert sampler_lib.Sampler.shared(cfg, max_len=128, stop_ids=[EOS], end_of_turn_id=EOT) \
      is not smp
  assert sampler_lib.Sampler.shared(dataclasses.replace(cfg, num_layers=1), max_len=64,
                                    stop_ids=[EOS], end_of_turn_id=EOT) is not smp
  with sharding.activate(sharding.make_mesh(1, 1, 1), sharding.RULES["fsdp"]):
    assert sampler_lib.Sampler.shared(cfg, max_len=64, stop_ids=[EOS],
                                      end_of_turn_id=EOT) is not smp


def test_same_bucket_batches_never_retrace(tiny):
  cfg, params = tiny
  smp = sampler_lib.Sampler(cfg, max_len=64, stop_ids=[EOS], end_of_turn_id=EOT)
  for seed, prompts in enumerate([PROMPTS, [[1] * 3, [2] * 12, [3] * 7], [[4] * 16] * 3]):
    state = smp.start(prompts, jax.random.key(seed))
    state = smp.generate(params, state, sampler_lib.SamplingConfig(max_new_tokens=4 + seed))
    state = smp.add_message(state, [[9, 9], [8], [7, 7, 7]])
    state = smp.generate(params, state, sampler_lib.SamplingConfig(max_new_tokens=3))
  # One prefill per chunk bucket (16 for prompts, 16 for 1 + message), one decode,
  # one append: calls with new lengths and max_new_tokens reuse them.
  assert smp._prefill._cache_size() == 1
  assert smp._decode._cache_size() == 1
  assert smp._append._cache_size() == 1
  # Prefill samples nothing: a greedy turn compiles its own decode, not another prefill.
  smp.generate(params, smp.start(PROMPTS, jax.random.key(9)), GREEDY)
  assert smp._decode._cache_size() == 2
  assert smp._prefill._cache_size() == 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_decode_in_cache_length_windows_equals_reading_the_whole_buffer(tiny, temperature):
  cfg, params = tiny
  sampling = sampler_lib.SamplingConfig(temperature=temperature, max_new_tokens=8)
  messages = [[[40, 41, 42, 43, 44, 45], [43], [45, 46]], [[50, 51]] * 3]

  def run(min_window):
    smp = sampler_lib.Sampler(cfg, max_len=128, stop_ids=[EOS], end_of_turn_id=EOT,
                              min_window=min_window)
    state = smp.generate(params, smp.start(PROMPTS, jax.random.key(3)), sampling)
    for msgs in messages:
      state = smp.generate(params, smp.add_message(state, msgs), sampling)
    return smp, smp.episode(state)

  windowed, ep = run(8)
  whole, ref = run(128)
  np.testing.assert_array_equal(ep.tokens_BxT, ref.tokens_BxT)
  np.testing.assert_array_equal(ep.turn_BxT, ref.turn_BxT)
  np.testing.assert_array_equal(ep.length_B, ref.length_B)
  np.testing.assert_allclose(ep.logp_BxT, ref.logp_BxT, atol=1e-5)
  # Rows grow from 13 prompt tokens to about 45: windows 16, 32 and 64 (8 is never
  # enough), one compile each; the whole buffer is one window.
  assert int(ep.length_B.max()) > 32
  assert windowed._decode._cache_size() == 3
  assert whole._decode._cache_size() == 1


def test_prefill_reads_only_the_filled_window(tiny):
  """A turn's prefill attends to the first `window(longest cache)` slots: NaN in every
  slot past that window changes nothing (a slot attention read would turn its row's
  logits into NaN), and its logits and cache equal prefilling over the whole buffer."""
  cfg, params = tiny
  smp = sampler_lib.Sampler(cfg, max_len=128, stop_ids=[EOS], end_of_turn_id=EOT,
                            min_window=8)
  state = smp.generate(params, smp.start(PROMPTS, jax.random.key(0)), GREEDY)
  state = smp.add_message(state, [[40, 41, 42], [43, 44], [45]])
  filled = int(state.cache.end_B.max())
  window = smp.window(filled)
  assert filled <= window < smp.max_len
  whole_state, whole_logits = smp._prefill(params, jax.tree.map(jnp.copy, state), chunk=16,
                                           window=smp.max_len)
  poison = lambda kv: kv.at[:, :, window:].set(jnp.nan)
  poisoned = state.replace(cache=state.cache.replace(
      k_LxBxSxKxH=poison(state.cache.k_LxBxSxKxH), v_LxBxSxKxH=poison(state.cache.v_LxBxSxKxH)))
  state, logits = smp.prefill(params, poisoned)
  assert np.isfinite(np.asarray(logits)).all()
  assert smp._prefill._cache_size() == 3  # Turn 1, the whole buffer, this window.
  np.testing.assert_allclose(logits, whole_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(state.cache.end_B, whole_state.cache.end_B)
  new = slice(filled - 8, int(state.cache.end_B.max()))  # Rows' newly written slots.
  np.testing.assert_allclose(state.cache.k_LxBxSxKxH[:, :, new],
                             whole_state.cache.k_LxBxSxKxH[:, :, new], rtol=1e-5, atol=1e-6)


def test_top_k_and_top_p_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  k2 = sampler_lib.filter_logits(logits, top_k=2, top_p=1.0)
  assert (np.asarray(k2)[0, 2:] < -1e30).all() and (np.asarray(k2)[0, :2] > -1e30).all()
  p = sampler_lib.filter_logits(logits, top_k=0, top_p=0.7)  # 0.5 + 0.3 reach 0.7.
  assert (np.asarray(p)[0, :2] > -1e30).all() and (np.asarray(p)[0, 2:] < -1e30).all()
  # Sampling only ever returns tokens inside the filter, and logp is unfiltered.
  cfg = sampler_lib.SamplingConfig(temperature=1.0, top_k=2)
  batch = jnp.repeat(logits, 256, axis=0)
  tokens, logp = sampler_lib.sample_token(batch, jax.random.key(0), cfg, jnp.arange(256))
  assert set(np.asarray(tokens).tolist()) == {0, 1}
  np.testing.assert_allclose(np.exp(logp), np.array([0.5, 0.3])[np.asarray(tokens)], rtol=1e-5)


def test_row_at_max_len_is_done_and_prompt_too_long_is_an_error(tiny):
  cfg, params = tiny
  smp = sampler_lib.Sampler(cfg, max_len=16, stop_ids=[EOS])
  state = smp.generate(params, smp.start([[1] * 12, [2] * 3], jax.random.key(0)),
                       sampler_lib.SamplingConfig(temperature=0.0, max_new_tokens=10))
  np.testing.assert_array_equal(state.length_B, [16, 13])
  with pytest.raises(ValueError, match="exceeds max_len=16"):
    smp.start([[1] * 17], jax.random.key(0))


def test_max_episode_len_bounds_attempts_that_never_stop(tiny):
  """Training batches are cut to `max_episode_len`: no episode may be longer, even when
  every attempt runs to max_new_tokens and is closed before the next message."""
  from jaxscore.sampling import rollout

  cfg, params = tiny
  num_turns, new, message = 3, 5, [40, 41, 42, 43]
  bound = rollout.episode_len_bound([len(p) for p in PROMPTS], num_turns, new, len(message))
  # Hand count for the 11-token prompt: 3 attempts of 5, 2 closing end-of-turns,
  # 2 messages of 4; the bound also leaves one slot per message for a closing token.
  assert bound == 11 + 3 * (5 + 1) + 2 * (4 + 1)
  # A stop id outside the vocabulary: no attempt ever ends early.
  smp = sampler_lib.Sampler(cfg, max_len=64, stop_ids=[cfg.vocab_size], end_of_turn_id=EOT)
  sampling = sampler_lib.SamplingConfig(temperature=1.0, max_new_tokens=new)
  state = smp.generate(params, smp.start(PROMPTS, jax.random.key(0)), sampling)
  for _ in range(num_turns - 1):
    state = smp.generate(params, smp.add_message(state, [message] * 3), sampling)
  lengths = np.asarray(state.length_B)
  np.testing.assert_array_equal(lengths, [len(p) + 3 * 5 + 2 + 2 * 4 for p in PROMPTS])
  assert lengths.max() <= bound


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_grouped_prefill_equals_prefilling_every_row(tiny, temperature):
  """G replies per prompt from one prefill per prompt: the same tokens and log-probs as
  starting G copies of each prompt, for a ragged batch, greedy and sampled, and on a
  second turn on the carried cache."""
  cfg, params = tiny
  group_size = 3
  sampling = sampler_lib.SamplingConfig(temperature=temperature, max_new_tokens=6)
  smp = sampler_lib.Sampler(cfg, max_len=48, stop_ids=[EOS], end_of_turn_id=EOT)
  rng = jax.random.key(7)
  grouped = smp.generate_grouped(params, smp.start(PROMPTS, rng), sampling, group_size)
  copies = [p for p in PROMPTS for _ in range(group_size)]
  every = smp.generate(params, smp.start(copies, rng), sampling)
  a, b = smp.episode(grouped), smp.episode(every)
  np.testing.assert_array_equal(a.tokens_BxT, b.tokens_BxT)
  np.testing.assert_array_equal(a.length_B, b.length_B)
  np.testing.assert_allclose(a.logp_BxT, b.logp_BxT, rtol=1e-5, atol=1e-6)
  message = [[40, 41]] * len(copies)
  a = smp.episode(smp.generate(params, smp.add_message(grouped, message), sampling))
  b = smp.episode(smp.generate(params, smp.add_message(every, message), sampling))
  np.testing.assert_array_equal(a.tokens_BxT, b.tokens_BxT)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_compacting_finished_rows_changes_no_row(tiny, temperature):
  """In turn 2 rows run into the buffer's end at 16 different steps (ragged prompts and
  messages), and the decoded batch shrinks as they finish: 16 rows -> 8 -> 4 -> 2.
  Every row's tokens, log-probs and turns equal decoding the whole batch throughout,
  greedy and sampled (each row keeps its own random stream), and for grouped rows."""
  cfg, params = tiny
  first = sampler_lib.SamplingConfig(temperature=temperature, max_new_tokens=20)
  second = dataclasses.replace(first, max_new_tokens=100)
  prompts = [[(3 * i + j) % 90 + 1 for j in range(2 + 3 * i)] for i in range(16)]
  messages = [[40 + i % 5] * (1 + i % 3) for i in range(16)]

  def run(min_compact_rows):
    smp = sampler_lib.Sampler(cfg, max_len=128, stop_ids=[EOS], end_of_turn_id=EOT,
                              min_compact_rows=min_compact_rows)
    rows, decode = [], smp._decode  # The batch size of every decode segment.
    smp._decode = lambda p, state, *a, **k: rows.append(state.done_B.shape[0]) or decode(
        p, state, *a, **k)
    state = smp.generate(params, smp.start(prompts, jax.random.key(5)), first)
    state = smp.generate(params, smp.add_message(state, messages), second)
    grouped = smp.generate_grouped(params, smp.start(prompts[::4], jax.random.key(6)),
                                   second, group_size=4)
    return set(rows), decode._cache_size(), smp.episode(state), smp.episode(grouped)

  rows, compiles, ep, grouped = run(2)
  whole_rows, whole_compiles, ref, grouped_ref = run(None)
  for got, want in ((ep, ref), (grouped, grouped_ref)):
    np.testing.assert_array_equal(got.tokens_BxT, want.tokens_BxT)
    np.testing.assert_array_equal(got.turn_BxT, want.turn_BxT)
    np.testing.assert_array_equal(got.length_B, want.length_B)
    np.testing.assert_allclose(got.logp_BxT, want.logp_BxT, atol=1e-5)
  assert rows == {16, 8, 4, 2} and whole_rows == {16}
  # One decode program per (window, row count) reached, never two for one pair.
  assert whole_compiles < compiles <= len(rows) * 4  # Windows 16 .. 128.


def test_padded_chunks_repeat_the_last_item_to_one_size():
  from jaxscore.sampling import sampler as sampler_lib

  assert list(sampler_lib.padded_chunks("abcde", 2)) == [
      (0, ["a", "b"], 2), (2, ["c", "d"], 2), (4, ["e", "e"], 1)]
  assert list(sampler_lib.padded_chunks([1, 2], 4)) == [(0, [1, 2, 2, 2], 2)]
  assert list(sampler_lib.padded_chunks([], 3)) == []
