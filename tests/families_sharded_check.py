"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_families.py).

For each family, and for Llama on an nf4-quantized base with LoRA adapters (QLoRA), a
tiny random model's forward pass and its cached decode, sharded over an fsdp mesh and
an fsdp x tensor mesh, must match one device (relative tolerance).
"""

import jax
import jax.numpy as jnp
import numpy as np
from numerics import assert_close

from jaxscore.infra import sharding
from jaxscore.models import lora, weights
from jaxscore.models import model as model_lib

assert jax.device_count() == 8, jax.devices()

# config.json fields of a tiny model of each family (everything else their defaults).
SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
HF = {
    "llama": dict(model_type="llama"),
    "qwen3": dict(model_type="qwen3", head_dim=16),
    "gemma2": dict(model_type="gemma2", head_dim=8, sliding_window=4,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    "gemma3": dict(model_type="gemma3_text", head_dim=8, sliding_window=4,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
}
B, T = 8, 12


def forward_and_decode(cfg, params):
  """Full-forward logits, and logits of the last 4 tokens decoded one at a time on a
  cache prefilled with the first T - 4."""
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
  full = jax.jit(lambda p, t: model_lib.apply(p, t, cfg)[0])(params, tokens)
  step = jax.jit(lambda p, t, c: model_lib.apply(p, t, cfg, cache=c))
  _, cache = step(params, tokens[:, :T - 4], model_lib.init_cache(cfg, B, T))
  decoded = []
  for i in range(T - 4, T):
    logits, cache = step(params, tokens[:, i:i + 1], cache)
    decoded.append(logits[:, 0])
  return np.asarray(full), np.asarray(jnp.stack(decoded, 1))


def qlora(cfg):
  """`cfg` on an nf4 base with trained-looking rank-4 adapters; blocks of 4 inputs, so
  the 8 blocks of a 32-wide input axis shard over 8 devices."""
  cfg = cfg.replace(lora=lora.LoraConfig(rank=4, quantize="nf4", quant_block=4))
  params = model_lib.init(cfg, jax.random.key(0), stddev=0.3)
  return cfg, jax.tree_util.tree_map_with_path(
      lambda path, x: (0.3 * jax.random.normal(jax.random.key(2), x.shape)
                       if lora.SUFFIX_B in jax.tree_util.keystr(path) else x), params)


CASES = {name: weights.config_from_hf(SIZES | fields) for name, fields in HF.items()}
CASES["qlora"] = CASES["llama"]
for name, cfg in CASES.items():
  if name == "qlora":
    cfg, params = qlora(cfg)
    assert lora.is_quantized(params["layers"]["q"])
  else:
    assert cfg.family == name
    params = model_lib.init(cfg, jax.random.key(0), stddev=0.3)
  ref_full, ref_decoded = forward_and_decode(cfg, params)
  assert_close(ref_decoded, ref_full[:, T - 4:], what=f"{name}: decode vs forward")
  for shape, rules_name in (((1, 8, 1), "fsdp"), ((2, 2, 2), "fsdp_tp")):
    mesh, rules = sharding.make_mesh(*shape), sharding.RULES[rules_name]
    with sharding.activate(mesh, rules):
      sharded = jax.device_put(params, sharding.param_shardings(cfg, mesh, rules))
      assert any(not p.sharding.is_fully_replicated for p in jax.tree.leaves(sharded))
      if name == "qlora":  # Scales split with their weight where their blocks divide.
        q = sharded["layers"]["q"]
        assert q.scale.sharding.spec == q.qvalue.sharding.spec, (q.scale.sharding, rules_name)
      full, decoded = forward_and_decode(cfg, sharded)
    assert_close(full, ref_full, what=f"{name} {rules_name}: forward")
    assert_close(decoded, ref_decoded, what=f"{name} {rules_name}: decode")
    print(f"OK family={name} mesh={shape} rules={rules_name}", flush=True)
