"""Model properties on tiny random configs: causality, cache, dtypes, axis names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscore.models import model as model_lib

CFG = model_lib.ModelConfig(vocab_size=97, num_layers=2, embed_dim=32, num_heads=4,
                            num_kv_heads=2, mlp_dim=48, rope_theta=10_000.0)


@pytest.fixture(scope="module")
def params():
  return model_lib.init(CFG, jax.random.key(0), stddev=0.2)


def _tokens(b, t, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size)


def test_changing_a_later_token_never_changes_earlier_logits(params):
  tokens = _tokens(2, 10)
  logits, _ = model_lib.apply(params, tokens, CFG)
  for t in (3, 9):
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % CFG.vocab_size)
    logits2, _ = model_lib.apply(params, changed, CFG)
    np.testing.assert_array_equal(logits[:, :t], logits2[:, :t])
    assert np.abs(logits[:, t:] - logits2[:, t:]).max() > 1e-3


def test_causality_through_gradients(params):
  """The logit at position 4 gets gradient from embedding rows of tokens 0..4 only."""
  tokens = jnp.arange(8)[None] * 3 + 1  # Distinct ids, so embedding rows map to positions.

  def logit_sum_at_4(embed_VxD):
    logits, _ = model_lib.apply(dict(params, embed=embed_VxD), tokens, CFG)
    return logits[0, 4].sum()

  grad_VxD = jax.grad(logit_sum_at_4)(params["embed"])
  per_position = np.abs(np.asarray(grad_VxD[tokens[0]])).sum(-1)
  assert (per_position[:5] > 0).all()
  np.testing.assert_array_equal(per_position[5:], 0.0)


def test_cached_decode_equals_full_forward_token_by_token(params):
  tokens = _tokens(2, 9, seed=1)
  full, _ = model_lib.apply(params, tokens, CFG)
  cache = model_lib.init_cache(CFG, batch_size=2, max_len=16)
  prefill, cache = model_lib.apply(params, tokens[:, :4], CFG, cache=cache)
  steps = [prefill]
  for t in range(4, 9):
    step, cache = model_lib.apply(params, tokens[:, t:t + 1], CFG, cache=cache)
    steps.append(step)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(cache.end_B, [9, 9])


def test_ragged_cache_rows_continue_after_their_own_last_token(params):
  """Row 0 has 5 real prompt tokens, row 1 has 3; each continues at its own end."""
  tokens = _tokens(2, 8, seed=2)
  mask = jnp.array([[1] * 5 + [0] * 3, [1] * 3 + [0] * 5])
  cache = model_lib.init_cache(CFG, batch_size=2, max_len=12)
  _, cache = model_lib.apply(params, tokens[:, :5], CFG, mask_BxT=mask[:, :5], cache=cache)
  np.testing.assert_array_equal(cache.end_B, [5, 3])
  nxt = jnp.array([[7, 8], [9, 10]])
  out, cache = model_lib.apply(params, nxt, CFG, cache=cache)
  for row, n in ((0, 5), (1, 3)):
    alone = jnp.concatenate([tokens[row:row + 1, :n], nxt[row:row + 1]], axis=1)
    ref, _ = model_lib.apply(params, alone, CFG)
    np.testing.assert_allclose(out[row], ref[0, n:], atol=1e-5, rtol=1e-5)


def test_sliding_window_limits_attention():
  cfg = CFG.replace(sliding_window=3, num_layers=1)
  p = model_lib.init(cfg, jax.random.key(1), stddev=0.2)
  tokens = _tokens(1, 8)
  logits, _ = model_lib.apply(p, tokens, cfg)
  # With one layer, position 7 sees positions 5..7 only.
  changed = tokens.at[0, 4].set((tokens[0, 4] + 1) % cfg.vocab_size)
  logits2, _ = model_lib.apply(p, changed, cfg)
  np.testing.assert_array_equal(logits[0, 7], logits2[0, 7])
  assert np.abs(logits[0, 6] - logits2[0, 6]).max() > 1e-4
  # The cache path applies the same window.
  cache = model_lib.init_cache(cfg, 1, 8)
  cached, _ = model_lib.apply(p, tokens, cfg, cache=cache)
  np.testing.assert_allclose(cached, logits, atol=1e-5)


def test_bfloat16_params_and_compute_track_float32(params):
  cfg16 = CFG.replace(param_dtype="bfloat16", dtype="bfloat16")
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  tokens = _tokens(2, 6)
  ref, _ = model_lib.apply(params, tokens, CFG)
  out, _ = model_lib.apply(p16, tokens, cfg16)
  assert out.dtype == jnp.float32  # Logits are always float32.
  assert np.abs(np.asarray(out) - np.asarray(ref)).max() < 0.1 * np.abs(ref).max()
  cache = model_lib.init_cache(cfg16, 2, 8)
  assert cache.k_LxBxSxKxH.dtype == jnp.bfloat16


def test_llama3_rope_scaling_matches_formula():
  cfg = CFG.replace(head_dim=16, rope_theta=500_000.0,
                    rope_scaling=model_lib.RopeScaling(
                        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=64))
  inv = np.asarray(model_lib.rope_inv_freq(cfg))
  base = 1.0 / 500_000.0 ** (np.arange(0, 16, 2) / 16)
  for b, s in zip(base, inv):
    wavelen = 2 * np.pi / b
    if wavelen < 64 / 4:  # High frequency: unchanged.
      np.testing.assert_allclose(s, b, rtol=1e-6)
    elif wavelen > 64 / 1:  # Low frequency: divided by the factor.
      np.testing.assert_allclose(s, b / 8, rtol=1e-6)
    else:
      smooth = (64 / wavelen - 1) / (4 - 1)
      np.testing.assert_allclose(s, (1 - smooth) * b / 8 + smooth * b, rtol=1e-6)


def test_every_param_and_cache_leaf_has_logical_axes(params):
  axes = model_lib.param_axes(CFG)
  is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x)
  assert all(is_axes(a) for a in jax.tree.leaves(axes, is_leaf=is_axes))
  flat_axes = jax.tree.leaves(axes, is_leaf=is_axes)
  flat_params = jax.tree.leaves(params)
  assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(params)
  for a, p in zip(flat_axes, flat_params):
    assert len(a) == p.ndim
  cache = model_lib.init_cache(CFG, 2, 8)
  for a, c in zip(jax.tree.leaves(model_lib.cache_axes(), is_leaf=is_axes),
                  jax.tree.leaves(cache)):
    assert len(a) == c.ndim
  qwen = CFG.replace(qkv_bias=True, tie_embeddings=True)
  assert "q_bias" in model_lib.param_axes(qwen)["layers"]
  assert "lm_head" not in model_lib.param_axes(qwen)


def test_bad_config_is_rejected():
  with pytest.raises(ValueError, match="num_kv_heads"):
    model_lib.ModelConfig(vocab_size=8, num_layers=1, embed_dim=8, num_heads=3,
                          num_kv_heads=2, mlp_dim=8)
  with pytest.raises(ValueError, match="dtype"):
    CFG.replace(dtype="float64")


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_rematerialized_layers_give_the_same_loss_and_gradients(params, policy):
  tokens = jax.random.randint(jax.random.key(5), (2, 9), 0, CFG.vocab_size)

  def loss(p, cfg):
    logits, _ = model_lib.apply(p, tokens, cfg)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

  want_loss, want = jax.value_and_grad(loss)(params, CFG)
  got_loss, got = jax.jit(jax.value_and_grad(loss), static_argnums=1)(
      params, CFG.replace(remat=policy))
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    # Recomputation reassociates float32 sums: agreement to float32 rounding, not bits.
    np.testing.assert_allclose(g, w, rtol=5e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  with pytest.raises(ValueError, match="remat='some'"):
    CFG.replace(remat="some")
