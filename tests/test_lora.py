"""LoRA adapters beside frozen weights: the model with them, and training only them."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscore.models import lora
from jaxscore.models import model as model_lib
from jaxscore.models import weights

BASE = weights.config_from_hf(dict(
    model_type="qwen3", vocab_size=97, hidden_size=32, intermediate_size=48,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8))
CFG = BASE.replace(lora=lora.LoraConfig(rank=4, alpha=8.0))


def _params(seed=0):
  base = model_lib.init(BASE, jax.random.key(seed), stddev=0.3)
  adapters = lora.init(CFG, jax.random.key(seed + 1))
  return base, adapters


def _tokens():
  return jax.random.randint(jax.random.key(7), (2, 9), 0, BASE.vocab_size)


def _logits(params, cfg):
  return np.asarray(model_lib.apply(params, _tokens(), cfg)[0])


def _trained(adapters):
  """Adapters as after some training: B no longer zero."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (0.2 * jax.random.normal(jax.random.key(3), x.shape)
                       if lora.SUFFIX_B in jax.tree_util.keystr(path) else x), adapters)


def test_fresh_adapters_are_exactly_the_base_model():
  base, adapters = _params()
  # B = 0 adds exact zeros; XLA may fuse the sum differently, hence float32 rounding.
  np.testing.assert_allclose(_logits(lora.combine(base, adapters), CFG),
                             _logits(base, BASE), rtol=1e-5, atol=1e-5)
  # The reference is the base params themselves, with the adapter config or without.
  np.testing.assert_array_equal(_logits(base, CFG), _logits(base, BASE))


def test_adapter_branch_equals_the_merged_weights():
  """x W + s (x A) B, computed per layer, against W + s A B formed explicitly."""
  base, adapters = _params()
  adapters = _trained(adapters)
  with_adapters = _logits(lora.combine(base, adapters), CFG)
  merged = lora.merge(lora.combine(base, adapters), CFG)
  assert set(merged["layers"]) == set(base["layers"])
  np.testing.assert_allclose(with_adapters, _logits(merged, BASE), rtol=1e-5, atol=1e-5)
  assert np.abs(with_adapters - _logits(base, BASE)).max() > 1e-2
  # By hand for one weight: q of layer 1.
  a, b = adapters["layers"]["q_lora_a"][1], adapters["layers"]["q_lora_b"][1]
  np.testing.assert_allclose(merged["layers"]["q"][1],
                             base["layers"]["q"][1] + 2.0 * np.einsum("dr,rnh->dnh", a, b),
                             rtol=1e-6, atol=1e-6)


def test_cached_decode_with_adapters_equals_the_full_forward():
  base, adapters = _params()
  params = lora.combine(base, _trained(adapters))
  tokens = _tokens()
  full, _ = model_lib.apply(params, tokens, CFG)
  _, cache = model_lib.apply(params, tokens[:, :5], CFG, cache=model_lib.init_cache(CFG, 2, 16))
  rest, _ = model_lib.apply(params, tokens[:, 5:], CFG, cache=cache)
  np.testing.assert_allclose(rest, full[:, 5:], rtol=1e-5, atol=1e-5)


def test_only_chosen_targets_get_adapters_with_their_axes():
  cfg = BASE.replace(lora=lora.LoraConfig(rank=2, targets="q,v,down"))
  axes = model_lib.param_axes(cfg)["layers"]
  assert {k for k in axes if lora.is_adapter(k)} == {
      "q_lora_a", "q_lora_b", "v_lora_a", "v_lora_b", "down_lora_a", "down_lora_b"}
  assert axes["q_lora_a"] == ("layers", "embed", "lora_rank")
  assert axes["q_lora_b"] == ("layers", "lora_rank", "heads", "head_dim")
  shapes = model_lib.param_shapes(cfg)["layers"]
  assert shapes["down_lora_a"] == (2, 48, 2) and shapes["down_lora_b"] == (2, 2, 32)
  with pytest.raises(ValueError, match="lora.targets='q,x'"):
    lora.LoraConfig(rank=2, targets="q,x")


def test_gradients_reach_the_adapters_and_leave_the_base_alone():
  base, adapters = _params()
  adapters = _trained(adapters)

  def loss(adapters, base):
    logits, _ = model_lib.apply(lora.combine(base, adapters), _tokens(), CFG)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 5])

  grads = jax.grad(loss)(adapters, base)
  assert set(grads["layers"]) == set(adapters["layers"])
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  # Against finite differences on one adapter entry.
  eps = 1e-3
  bump = lambda s: jax.tree_util.tree_map_with_path(
      lambda p, x: x.at[0, 0, 0].add(s) if jax.tree_util.keystr(p).endswith(
          "['up_lora_a']") else x, adapters)
  fd = (loss(bump(eps), base) - loss(bump(-eps), base)) / (2 * eps)
  np.testing.assert_allclose(grads["layers"]["up_lora_a"][0, 0, 0], fd, rtol=2e-2, atol=1e-5)


# ---------------------------------------------------------------------------
# Training the adapters alone, in the loops.


def _lora_config(rank=4):
  from test_checkpoint import _config

  c = _config()
  c.model.lora.rank = rank
  return c


@pytest.mark.slow
def test_a_lora_run_trains_adapters_only_and_resumes_exactly(tmp_path):
  """SCoRe on a tiny model with rank-4 adapters: the state is the adapters and their
  optimizer moments; the base (the reference) is never written; stopping and resuming
  gives the straight run's adapters bit for bit; the checkpoint holds adapters only."""
  from test_checkpoint import _metrics, _tiny_setup

  from jaxscore.loops import common, online
  from jaxscore.models import pretrained

  setup, params = _tiny_setup()
  c = _lora_config()
  setup = dataclasses.replace(setup, cfg=setup.cfg.replace(lora=pretrained.lora_config(c.model)))
  base_before = jax.tree.map(np.array, params)
  straight, _ = online.train(c, setup, params, params, tmp_path / "a")
  base, adapters = lora.split(straight.params)
  assert set(adapters["layers"]) == {f"{t}{s}" for t in lora.TARGETS
                                     for s in (lora.SUFFIX_A, lora.SUFFIX_B)}
  jax.tree.map(np.testing.assert_array_equal, base, base_before)  # Frozen.
  assert any(float(np.abs(x).max()) > 0 for k, x in adapters["layers"].items()
             if k.endswith(lora.SUFFIX_B))  # B moved off zero: the adapters learned.
  half, info = online.train(c, setup, params, params, tmp_path / "b", stop_after=2)
  resumed, info = online.train(c, setup, params, params, tmp_path / "b")
  assert info["step"] == 4
  jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)
  assert _metrics(tmp_path / "b") == _metrics(tmp_path / "a")
  restored, step = common.restore_params(c, tmp_path / "a", setup.cfg, params)
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, restored, straight.params)
  # Adapters belong to their base and their shape: another rank does not resume them.
  other = _lora_config(rank=2)
  other.score.stages = "I:2,II:3"
  other_setup = dataclasses.replace(setup, cfg=setup.cfg.replace(
      lora=pretrained.lora_config(other.model)))
  from jaxscore.models import weights

  with pytest.raises(weights.CheckpointError, match="trained with lora="):
    online.train(other, other_setup, params, params, tmp_path / "a")
  state_bytes = sum(f.stat().st_size for f in (tmp_path / "a" / "checkpoints").rglob("*")
                    if f.is_file())
  weights_bytes = sum(x.nbytes for x in jax.tree.leaves(base_before))
  assert state_bytes < weights_bytes  # Adapters and moments, not the weights.


def test_merged_export_matches_the_adapter_forward_in_transformers(tmp_path):
  from conftest import require_torch
  from hf_tiny import hf_logits, padded_batch

  from jaxscore.models import hf_checkpoint

  torch = require_torch()
  import transformers

  base, adapters = _params()
  params = lora.combine(base, _trained(adapters))
  hf_checkpoint.save_hf(tmp_path, BASE, jax.tree.map(np.asarray, lora.merge(params, CFG)))
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, dtype=torch.float32, attn_implementation="eager")
  tokens, mask = padded_batch(BASE.vocab_size)
  ours = np.asarray(model_lib.apply(params, tokens, CFG, mask_BxT=mask)[0])
  diff = np.abs(ours - hf_logits(hf, tokens, mask))[mask.astype(bool)].max()
  assert diff < 1e-4, diff
