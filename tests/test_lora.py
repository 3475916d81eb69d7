"""LoRA adapters beside frozen weights: the model with them, and training only them."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscore.models import layers, lora, weights
from jaxscore.models import model as model_lib

BASE = weights.config_from_hf(dict(
    model_type="qwen3", vocab_size=97, hidden_size=32, intermediate_size=48,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8))
CFG = BASE.replace(lora=lora.LoraConfig(rank=4, alpha=8.0))


def _params(seed=0):
  base = model_lib.init(BASE, jax.random.key(seed), stddev=0.3)
  adapters = model_lib.init_lora(CFG, jax.random.key(seed + 1))
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


@pytest.mark.parametrize("with_adapters", [False, True])
def test_gate_and_up_stacked_into_one_matmul_equal_two(monkeypatch, with_adapters):
  """Calls of many tokens run gate and up as one matmul over the stacked weights: the
  logits and every gradient equal those of the two separate matmuls."""
  base, adapters = _params()
  params, cfg = ((lora.combine(base, _trained(adapters)), CFG) if with_adapters
                 else (base, BASE))

  def run(min_tokens):
    monkeypatch.setattr(layers, "STACK_GATE_UP_MIN_TOKENS", min_tokens)

    def loss(params):  # A new function each time: JAX caches traces by function.
      logits, _ = model_lib.apply(params, _tokens(), cfg)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 5])

    stacked = any(e.primitive.name == "dot_general"
                  and e.invars[1].aval.shape == (cfg.embed_dim, 2, cfg.mlp_dim)
                  for e in _all_eqns(jax.make_jaxpr(loss)(params).jaxpr))
    return stacked, jax.value_and_grad(loss)(params)

  stacked, (got_loss, got) = run(1)
  separate, (want_loss, want) = run(10**9)
  assert stacked and not separate
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    # One matmul over both weights sums the input's gradient in another order: float32
    # rounding, not bits.
    np.testing.assert_allclose(g, w, rtol=5e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def _all_eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in it (scan, checkpoint)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for inner in (v if isinstance(v, (list, tuple)) else [v]):
        inner = getattr(inner, "jaxpr", inner)
        if hasattr(inner, "eqns"):
          yield from _all_eqns(inner)


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


# ---------------------------------------------------------------------------
# QLoRA: the frozen base stored quantized.

# The QLoRA paper's NormalFloat-4 code (Dettmers et al. 2023, appendix E).
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0])


def _qcfg(quantize, block=8):
  return CFG.replace(lora=lora.LoraConfig(rank=4, alpha=8.0, quantize=quantize,
                                          quant_block=block))


def _blocks(w, axis, block):
  """w with `axis` split into (blocks, block) and moved last: (..., blocks, block)."""
  w = np.moveaxis(np.asarray(w, np.float64), axis, -1)
  return w.reshape(*w.shape[:-1], w.shape[-1] // block, block)


def _dequantized_by_hand(w, axis, block, quantize):
  """Blockwise absmax quantization written out with numpy: nearest code times scale."""
  x = _blocks(w, axis, block)
  absmax = np.abs(x).max(-1, keepdims=True)
  if quantize == "int8":
    scale = absmax / 127.5
    out = np.clip(np.round(x / scale), -128, 127) * scale
  else:
    codes = np.abs(x[..., None] / absmax[..., None] - NF4).argmin(-1)
    out = NF4[codes] * absmax
  out = out.reshape(*out.shape[:-2], -1)
  return np.moveaxis(out, -1, axis), absmax


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
@pytest.mark.parametrize("name,axis", [("q", 1), ("o", 2), ("down", 1)])
def test_quantized_weights_equal_blockwise_absmax_by_hand(quantize, name, axis):
  base, _ = _params()
  cfg = _qcfg(quantize)
  w = base["layers"][name]
  qw = lora.quantize_base(base, cfg)["layers"][name]
  assert lora.is_quantized(qw)
  assert qw.qvalue.dtype == (jnp.int8 if quantize == "int8" else jnp.uint4)
  deq = np.asarray(lora.dequantize(qw), np.float64)
  want, absmax = _dequantized_by_hand(w, axis, 8, quantize)
  # A block's extreme sits at code +-127.5 by construction, a tie that float32 rounding
  # settles either way: there either neighbouring code is right.
  extreme = _blocks(np.abs(np.asarray(w)), axis, 8) >= absmax * (1 - 1e-6)
  extreme = np.moveaxis(extreme.reshape(*extreme.shape[:-2], -1), -1, axis)
  close = np.isclose(deq, want, rtol=1e-5, atol=1e-6)
  assert (close | extreme).all()
  assert close.mean() > 0.8
  # The error bound: half a step of int8, half the widest gap of the NF4 code.
  half_step = 0.5 / 127.5 if quantize == "int8" else np.diff(NF4).max() / 2
  err = _blocks(np.abs(deq - np.asarray(w)), axis, 8)
  assert (err <= half_step * absmax + 1e-6).all()


def test_block_must_divide_the_input_axis():
  base, _ = _params()
  with pytest.raises(ValueError, match="quant_block=5 does not divide"):
    lora.quantize_base(base, _qcfg("nf4", block=5))
  with pytest.raises(ValueError, match="lora.quantize='nf4' needs lora.rank > 0"):
    lora.LoraConfig(rank=0, quantize="nf4")
  with pytest.raises(ValueError, match="lora.quantize='int4'"):
    lora.LoraConfig(rank=4, quantize="int4")


def test_qlora_forward_is_the_dequantized_base_with_adapters():
  """The model on a quantized base runs the dequantized weights (to float32 rounding)
  and its cached decode agrees; int8 (256 levels) moves the logits far less than nf4
  (16 levels)."""
  base, adapters = _params()
  adapters = _trained(adapters)
  full = _logits(lora.combine(base, adapters), CFG)
  errors = {}
  for quantize in ("int8", "nf4"):
    cfg = _qcfg(quantize)
    qparams = lora.combine(lora.quantize_base(base, cfg), adapters)
    ours = _logits(qparams, cfg)
    np.testing.assert_allclose(ours, _logits(lora.merge(qparams, cfg), BASE),
                               rtol=1e-5, atol=1e-5)
    errors[quantize] = np.abs(ours - full).max()
    tokens = _tokens()
    _, cache = model_lib.apply(qparams, tokens[:, :5], cfg,
                               cache=model_lib.init_cache(cfg, 2, 16))
    rest, _ = model_lib.apply(qparams, tokens[:, 5:], cfg, cache=cache)
    np.testing.assert_allclose(rest, ours[:, 5:], rtol=1e-5, atol=1e-5)
  assert 0 < errors["int8"] < errors["nf4"] / 5, errors


def test_qlora_gradients_reach_the_adapters_only():
  base, adapters = _params()
  cfg = _qcfg("nf4")
  qbase = lora.quantize_base(base, cfg)

  def loss(adapters, base):
    logits, _ = model_lib.apply(lora.combine(base, adapters), _tokens(), cfg)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 5])

  grads = jax.grad(loss)(_trained(adapters), qbase)
  assert set(grads["layers"]) == set(adapters["layers"])
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  # The base's quantized values are integers: no gradient can be taken through them.
  with pytest.raises(TypeError):
    jax.grad(loss, argnums=1)(adapters, qbase)



@pytest.mark.slow
def test_a_qlora_run_trains_on_the_quantized_base_and_resumes_exactly(tmp_path):
  """SCoRe with rank-4 adapters on an nf4 base: the policy's projections are stored
  quantized, the adapters learn, a stopped run resumes to the straight run's adapters
  bit for bit, and the restored policy is the same quantized base with them."""
  from test_checkpoint import _tiny_setup

  from jaxscore.loops import common, online
  from jaxscore.models import pretrained

  setup, params = _tiny_setup()
  c = _lora_config()
  c.score.stages = "I:1,II:2"
  c.model.lora.quantize, c.model.lora.quant_block = "nf4", 8
  setup = dataclasses.replace(setup, cfg=setup.cfg.replace(lora=pretrained.lora_config(c.model)))
  straight, _ = online.train(c, setup, params, params, tmp_path / "a")
  base, adapters = lora.split(straight.params)
  assert all(lora.is_quantized(base["layers"][t]) for t in lora.TARGETS)
  assert any(float(np.abs(x).max()) > 0 for k, x in adapters["layers"].items()
             if k.endswith(lora.SUFFIX_B))
  online.train(c, setup, params, params, tmp_path / "b", stop_after=1)
  resumed, info = online.train(c, setup, params, params, tmp_path / "b")
  assert info["step"] == 3
  jax.tree.map(np.testing.assert_array_equal, lora.split(resumed.params)[1], adapters)
  restored, _ = common.restore_params(c, tmp_path / "a", setup.cfg, params)
  tokens = _tokens() % setup.cfg.vocab_size
  np.testing.assert_array_equal(model_lib.apply(restored, tokens, setup.cfg)[0],
                                model_lib.apply(straight.params, tokens, setup.cfg)[0])


def test_peft_adapter_directory_loads_in_peft_with_the_same_logits(tmp_path):
  """The adapters alone (some targets), written as PEFT's LoRA format, on the base in
  transformers: the same logits as jaxscore's adapter forward."""
  from conftest import require_torch
  from hf_tiny import hf_logits, padded_batch

  from jaxscore import export
  from jaxscore.models import hf_checkpoint

  torch = require_torch()
  peft = pytest.importorskip("peft")
  import transformers

  base, adapters = _params()
  adapters = _trained(adapters)
  cfg = BASE.replace(lora=lora.LoraConfig(rank=4, alpha=8.0, targets="q,o,gate,down"))
  adapters = {"layers": {k: v for k, v in adapters["layers"].items()
                         if k.split("_lora")[0] in cfg.lora.target_names}}
  hf_checkpoint.save_hf(tmp_path / "base", BASE, jax.tree.map(np.asarray, base))
  export.save_peft_adapter(tmp_path / "adapter", cfg, adapters, str(tmp_path / "base"))
  config = __import__("json").loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert config["target_modules"] == ["down_proj", "gate_proj", "o_proj", "q_proj"]
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "base", dtype=torch.float32, attn_implementation="eager")
  with_adapter = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
  tokens, mask = padded_batch(BASE.vocab_size)
  ours = np.asarray(model_lib.apply(lora.combine(base, adapters), tokens, cfg, mask_BxT=mask)[0])
  theirs = hf_logits(with_adapter, tokens, mask)
  assert np.abs(ours - theirs)[mask.astype(bool)].max() < 1e-4
  plain = np.asarray(model_lib.apply(base, tokens, BASE, mask_BxT=mask)[0])
  assert np.abs(ours - plain)[mask.astype(bool)].max() > 1e-2  # The adapters matter.


def test_the_backward_pass_keeps_no_dequantized_copy_of_the_base():
  """The gradient of a QLoRA forward needs the weights again; it dequantizes them again
  rather than keeping every layer's full-precision copy: its temporaries exceed plain
  LoRA's by one layer's float32 projections, not the stack's (XLA's memory analysis)."""
  cfg = model_lib.ModelConfig(vocab_size=64, num_layers=4, embed_dim=256, num_heads=4,
                              num_kv_heads=2, mlp_dim=1024)
  params = model_lib.init(cfg, jax.random.key(0))
  tokens = jnp.zeros((2, 16), jnp.int32)
  temps = {}
  for quantize in ("none", "nf4"):
    qcfg = cfg.replace(lora=lora.LoraConfig(rank=4, quantize=quantize))
    base = lora.quantize_base(params, qcfg)
    loss = lambda a, b: jnp.mean(model_lib.apply(lora.combine(b, a), tokens, qcfg)[0])
    adapters = model_lib.init_lora(qcfg, jax.random.key(1))
    compiled = jax.jit(jax.grad(loss)).lower(adapters, base).compile()
    temps[quantize] = compiled.memory_analysis().temp_size_in_bytes
  projections = 4 * sum(params["layers"][t].size for t in lora.TARGETS)  # float32 bytes.
  # One layer's dequantized weights at a time, not all four layers'.
  assert temps["nf4"] - temps["none"] <= 1.25 * projections / cfg.num_layers, (
      temps, projections)
