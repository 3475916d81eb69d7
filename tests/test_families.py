"""Model families against transformers: the KV cache past the sliding window, greedy
generation, the sharded forward, and a family added from outside the package."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import report_parity, require_torch
from hf_tiny import FAMILIES, SLIDING, hf_logits, make_hf_model

from jaxscore.models import families, hf_checkpoint, layers, weights
from jaxscore.models import model as model_lib
from jaxscore.sampling import sampler as sampler_lib

NEW = ["qwen3", "gemma2", "gemma3"]


def _loaded(family, tmp_path):
  hf = make_hf_model(family)
  hf.save_pretrained(tmp_path)
  cfg, params = hf_checkpoint.load_hf(tmp_path)
  return hf, cfg, jax.tree.map(jnp.asarray, params)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_decode_past_the_window_matches_transformers(family, tmp_path):
  """A 6-token prefill, then 18 tokens one at a time (past the 5-token window of the
  sliding families): every position's logits equal transformers' full forward."""
  require_torch()
  hf, cfg, params = _loaded(family, tmp_path)
  tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(2, 24))
  ref = hf_logits(hf, tokens, np.ones_like(tokens))
  step = jax.jit(lambda p, t, c: model_lib.apply(p, t, cfg, cache=c))
  logits, cache = step(params, tokens[:, :6], model_lib.init_cache(cfg, 2, 32))
  ours = [np.asarray(logits)]
  for i in range(6, 24):
    logits, cache = step(params, tokens[:, i:i + 1], cache)
    ours.append(np.asarray(logits))
  diff = np.abs(np.concatenate(ours, axis=1) - ref).max()
  report_parity(f"{family}: cached decode, 24 tokens", diff, 1e-4)
  assert diff <= 1e-4
  if family in SLIDING:  # The window binds: a global-only model differs.
    wide = cfg.replace(sliding_window=None, sliding_layers=None)
    full, _ = model_lib.apply(params, jnp.asarray(tokens), wide)
    assert np.abs(np.asarray(full) - ref)[:, 6:].max() > 1e-2


@pytest.mark.parametrize("family", NEW + ["mistral"])
def test_32_greedy_tokens_equal_transformers_generate(family, tmp_path):
  torch = require_torch()
  hf, cfg, params = _loaded(family, tmp_path)
  prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
  smp = sampler_lib.Sampler(cfg, max_len=48, stop_ids=[100])
  state = smp.generate(params, smp.start(prompts, jax.random.key(0)),
                       sampler_lib.SamplingConfig(temperature=0.0, max_new_tokens=32))
  ours = smp.episode(state).response_ids(1)
  for row, prompt in enumerate(prompts):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                      eos_token_id=100, pad_token_id=0)
    assert ours[row] == out[0, len(prompt):].tolist(), row


def test_family_features_come_from_config_json(tmp_path):
  require_torch()
  _, qwen3, _ = _loaded("qwen3", tmp_path / "q")
  assert (qwen3.family, qwen3.qk_norm, qwen3.qkv_bias, qwen3.head_dim) == ("qwen3", True,
                                                                          False, 24)
  _, g2, _ = _loaded("gemma2", tmp_path / "g2")
  assert (g2.norm_offset, g2.scale_embeddings, g2.mlp_activation, g2.attn_softcap,
          g2.final_softcap, g2.query_pre_attn_scalar) == (1.0, True, "gelu_tanh", 2.0, 3.0, 24)
  assert g2.layer_is_sliding == (True, False)  # Gemma 2 alternates, sliding first.
  _, g3, _ = _loaded("gemma3", tmp_path / "g3")
  assert g3.layer_is_sliding == (True, True, False) and g3.qk_norm
  assert (g3.rope_theta, g3.local_rope_theta, g3.rope_scaling.factor) == (1e6, 1e4, 4.0)
  assert g3.attn_softcap is None and g3.final_softcap is None


def test_gemma3_hub_configs_in_the_transformers_4_layout():
  """What the Hub's gemma-3 config.json files say: rope_theta / rope_local_base_freq /
  rope_scaling, sliding_window_pattern, defaults left out; and the multimodal file's
  text_config."""
  text = {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 96,
          "num_hidden_layers": 12, "num_attention_heads": 4, "num_key_value_heads": 1,
          "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
          "rope_scaling": {"rope_type": "linear", "factor": 8.0},
          "sliding_window_pattern": 6, "sliding_window": 1024}
  cfg = weights.config_from_hf(text)
  assert cfg.layer_is_sliding == (True,) * 5 + (False,) + (True,) * 5 + (False,)
  assert (cfg.vocab_size, cfg.head_dim, cfg.query_pre_attn_scalar) == (262_208, 256, 256)
  assert (cfg.local_rope_theta, cfg.rope_scaling.factor) == (10_000.0, 8.0)
  multimodal = {"model_type": "gemma3", "text_config": dict(text, model_type="gemma3_text"),
                "vision_config": {"model_type": "siglip_vision_model"}}
  assert weights.config_from_hf(multimodal) == cfg


def test_multimodal_checkpoint_loads_its_text_tower(tmp_path):
  """The Hub's gemma-3-4b-it keeps the text tower under `language_model.model.`."""
  require_torch()
  hf, cfg, params = _loaded("gemma3", tmp_path / "text")
  from safetensors.numpy import save_file

  tensors = weights.params_to_tensors(jax.tree.map(np.asarray, params), cfg)
  out = tmp_path / "mm"
  out.mkdir()
  save_file({"language_model." + k: v for k, v in tensors.items()} |
            {"vision_tower.patch.weight": np.zeros((2, 2), np.float32)},
            str(out / "model.safetensors"))
  import json

  text = weights.config_to_hf(cfg)
  (out / "config.json").write_text(json.dumps(
      {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
       "text_config": text}))
  cfg2, params2 = hf_checkpoint.load_hf(out)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, jax.tree.map(np.asarray, params))


def test_unsupported_variants_are_named():
  base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4)
  with pytest.raises(families.CheckpointError, match="Qwen3 sliding-window"):
    weights.config_from_hf(base | {"model_type": "qwen3", "use_sliding_window": True})
  with pytest.raises(families.CheckpointError, match="hidden_activation='relu'"):
    weights.config_from_hf(base | {"model_type": "gemma2", "hidden_activation": "relu"})
  with pytest.raises(families.CheckpointError, match="layer_types has 'chunked_attention'"):
    weights.config_from_hf(base | {"model_type": "gemma3_text",
                                   "layer_types": ["chunked_attention"] * 2})
  with pytest.raises(families.CheckpointError, match="model_type='gpt2' is not supported; "
                     "jaxscore supports gemma2, gemma3, gemma3_text, llama"):
    weights.config_from_hf(base | {"model_type": "gpt2"})


def test_sharded_forward_on_8_devices_matches_one_device():
  script = pathlib.Path(__file__).with_name("families_sharded_check.py")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  for name in ("llama", "qwen3", "gemma2", "gemma3", "qlora"):
    for rules in ("fsdp", "fsdp_tp"):
      assert f"OK family={name} " in out.stdout and f"rules={rules}" in out.stdout


# ---------------------------------------------------------------------------
# A family added from outside the package: one class and one `register` call.


class ParallelBlock(families.Family):
  """GPT-J / PaLM-style: attention and MLP read the same norm, and both add to x."""

  name = "toy-parallel"
  model_types = ("toy_parallel",)
  architecture = "ToyParallelForCausalLM"

  def config_from_hf(self, hf, source):
    return families.base.common_fields(hf, source) | dict(family=self.name)

  def config_to_hf(self, cfg):
    return families.base.common_to_hf(cfg)

  def layer_axes(self, cfg):
    return {"norm": ("layers", "norm"), **layers.attention_axes(cfg), **layers.MLP_AXES}

  def layer_tensors(self, cfg):
    return {"norm": families.Tensor("model.layers.{i}.ln.weight", (cfg.embed_dim,)),
            **families.base.attention_tensors(cfg), **families.base.mlp_tensors(cfg)}

  def block(self, x, lp, cfg, positions, inv_freq, attend):
    h = layers.rms_norm(x, lp["norm"], cfg.rms_norm_eps)
    out, extra = attend(*layers.qkv(h, lp, cfg, positions, inv_freq))
    return x + layers.out_proj(out, lp, cfg) + layers.gated_mlp(h, lp, cfg), extra


def _by_hand(params, tokens, cfg):
  """The parallel block written out with numpy-level jnp ops, no cache, no scan."""
  x = params["embed"][tokens]
  t = tokens.shape[1]
  pos = jnp.arange(t)[None]
  inv = layers.global_inv_freq(cfg)
  causal = jnp.tril(jnp.ones((t, t), bool))
  for i in range(cfg.num_layers):
    lp = jax.tree.map(lambda w: w[i], params["layers"])
    h = layers.rms_norm(x, lp["norm"], cfg.rms_norm_eps)
    q = layers.apply_rope(jnp.einsum("btd,dnh->btnh", h, lp["q"]), pos, inv)
    k = layers.apply_rope(jnp.einsum("btd,dkh->btkh", h, lp["k"]), pos, inv)
    v = jnp.einsum("btd,dkh->btkh", h, lp["v"])
    g = cfg.num_heads // cfg.num_kv_heads
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(cfg.head_dim)
    p = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
    attn = jnp.einsum("bnqk,bknh->bqnh", p, v)
    mlp = (jax.nn.silu(h @ lp["gate"]) * (h @ lp["up"])) @ lp["down"]
    x = x + jnp.einsum("btnh,nhd->btd", attn, lp["o"]) + mlp
  x = layers.rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
  return x @ params["lm_head"]


def test_a_new_family_is_one_class_and_one_register_call(tmp_path, monkeypatch):
  # The registry as it was, after this test.
  monkeypatch.setattr(families.base, "_BY_NAME", dict(families.base._BY_NAME))
  monkeypatch.setattr(families.base, "_BY_MODEL_TYPE", dict(families.base._BY_MODEL_TYPE))
  families.register(ParallelBlock())
  cfg = weights.config_from_hf(dict(model_type="toy_parallel", vocab_size=50,
                                    hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2))
  params = model_lib.init(cfg, jax.random.key(0), stddev=0.3)
  tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, cfg.vocab_size)
  logits, _ = model_lib.apply(params, tokens, cfg)
  np.testing.assert_allclose(logits, _by_hand(params, tokens, cfg), rtol=1e-4, atol=1e-4)
  # The cache, the sampler and the checkpoint code work without knowing the family.
  _, cache = model_lib.apply(params, tokens[:, :4], cfg, cache=model_lib.init_cache(cfg, 2, 8))
  last, _ = model_lib.apply(params, tokens[:, 4:], cfg, cache=cache)
  np.testing.assert_allclose(last, logits[:, 4:], rtol=1e-4, atol=1e-4)
  hf_checkpoint.save_hf(tmp_path, cfg, jax.tree.map(np.asarray, params))
  cfg2, params2 = hf_checkpoint.load_hf(tmp_path)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, jax.tree.map(np.asarray, params))
  with pytest.raises(ValueError, match="already loaded by family 'toy-parallel'"):
    other = ParallelBlock()
    other.name = "toy-other"
    families.register(other)


# ---------------------------------------------------------------------------
# Named shapes: the released models' config.json, read by their families.


def test_named_shapes_have_the_published_parameter_counts():
  from jaxscore.models import shapes

  count = lambda name: shapes.num_params(shapes.config(name))
  assert count("llama3.1-8b") == 8_030_261_248  # The checkpoint's safetensors total.
  assert count("gemma3-1b") == 999_885_952  # KerasHub's gemma3_1b preset.
  # KerasHub's text-only 4B and 12B presets count a 262,144-token vocabulary; the Hub's
  # text towers have 64 more (image) tokens.
  assert count("gemma3-4b") == 3_880_099_328 + 64 * 2560
  assert count("gemma3-12b") == 11_765_788_416 + 64 * 3840
  # Qwen3's model cards give non-embedding counts: 0.44B and 6.95B.
  for name, non_embedding in (("qwen3-0.6b", 0.44e9), ("qwen3-8b", 6.95e9)):
    cfg = shapes.config(name)
    embeddings = cfg.vocab_size * cfg.embed_dim * (1 if cfg.tie_embeddings else 2)
    assert abs(count(name) - embeddings - non_embedding) < 0.005e9, name
  g = shapes.config("gemma3-12b")
  assert g.layer_is_sliding[:6] == (True,) * 5 + (False,) and g.rope_scaling.factor == 8.0
  with pytest.raises(ValueError, match="unknown model shape 'gemma9'"):
    shapes.config("gemma9")
