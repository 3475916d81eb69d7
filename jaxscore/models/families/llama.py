"""Llama (2, 3, 3.1/3.2 RoPE scaling; SmolLM2), Mistral (sliding window on every layer)
and Qwen2 (biases on q, k, v): one pre-norm block with a SwiGLU MLP."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from jaxscore.models import layers
from jaxscore.models.config import ModelConfig
from jaxscore.models.families import base


def pre_norm_block(x_BxTxD, lp, cfg: ModelConfig, positions_BxT, inv_freq_H2, attend):
  """x + attn(norm(x)), then x + mlp(norm(x))."""
  h = layers.rms_norm(x_BxTxD, lp["attn_norm"], cfg.rms_norm_eps, cfg.norm_offset)
  q, k, v = layers.qkv(h, lp, cfg, positions_BxT, inv_freq_H2)
  attn_BxTxQxH, extra = attend(q, k, v)
  x_BxTxD = x_BxTxD + layers.out_proj(attn_BxTxQxH, lp, cfg)
  h = layers.rms_norm(x_BxTxD, lp["mlp_norm"], cfg.rms_norm_eps, cfg.norm_offset)
  x_BxTxD = x_BxTxD + layers.gated_mlp(h, lp, cfg)
  return nn.with_logical_constraint(x_BxTxD, layers.ACT_EMBED), extra


def pre_norm_axes(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
  return {"attn_norm": ("layers", "norm"), "mlp_norm": ("layers", "norm"),
          **layers.attention_axes(cfg), **layers.MLP_AXES}


def pre_norm_tensors(cfg: ModelConfig) -> dict[str, base.Tensor]:
  d = cfg.embed_dim
  return {"attn_norm": base.Tensor("model.layers.{i}.input_layernorm.weight", (d,)),
          "mlp_norm": base.Tensor("model.layers.{i}.post_attention_layernorm.weight", (d,)),
          **base.attention_tensors(cfg), **base.mlp_tensors(cfg)}


class Llama(base.Family):
  name = "llama"
  model_types = ("llama",)
  architecture = "LlamaForCausalLM"

  # Checkpoints may mark some layers sliding (Qwen's `use_sliding_window`); the family
  # has no such layers, so they are refused rather than run as global ones.
  refuses_sliding = False

  def check(self, hf: Mapping[str, Any], source: str) -> None:
    """What the block cannot run, refused by name."""
    if hf.get("hidden_act", "silu") != "silu":
      raise base.CheckpointError(f"{source}: hidden_act={hf['hidden_act']!r}; only silu")
    if hf.get("mlp_bias"):
      raise base.CheckpointError(f"{source}: mlp_bias=true is not supported")
    if hf.get("attention_bias"):
      raise base.CheckpointError(f"{source}: attention_bias=true (o_proj bias) is not "
                                 "supported")
    if self.refuses_sliding and (hf.get("use_sliding_window") or
                                 "sliding_attention" in set(hf.get("layer_types") or ())):
      raise base.CheckpointError(f"{source}: {type(self).__name__} sliding-window layers "
                                 "are not supported")

  def config_from_hf(self, hf, source):
    self.check(hf, source)
    fields = base.common_fields(hf, source)
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta, scaling = base.parse_rope(rope, hf.get("rope_theta", 10_000.0), source,
                                     hf.get("max_position_embeddings", 8192))
    return fields | dict(family=self.name, rope_theta=theta, rope_scaling=scaling,
                         tie_embeddings=bool(hf.get("tie_word_embeddings", False)))

  def config_to_hf(self, cfg):
    return {**base.common_to_hf(cfg), "hidden_act": "silu", "rope_theta": cfg.rope_theta,
            "rope_parameters": base.rope_to_hf(cfg.rope_theta, cfg.rope_scaling),
            "attention_bias": False, "mlp_bias": False}

  def layer_axes(self, cfg):
    return pre_norm_axes(cfg)

  def layer_tensors(self, cfg):
    return pre_norm_tensors(cfg)

  def block(self, x_BxTxD, lp, cfg, positions_BxT, inv_freq_H2, attend):
    return pre_norm_block(x_BxTxD, lp, cfg, positions_BxT, inv_freq_H2, attend)


class Mistral(Llama):
  name = "mistral"
  model_types = ("mistral",)
  architecture = "MistralForCausalLM"

  def config_from_hf(self, hf, source):
    return super().config_from_hf(hf, source) | dict(sliding_window=hf.get("sliding_window"))

  def config_to_hf(self, cfg):
    out = super().config_to_hf(cfg) | {"sliding_window": cfg.sliding_window}
    del out["attention_bias"], out["mlp_bias"]
    return out


class Qwen2(Llama):
  name = "qwen2"
  model_types = ("qwen2",)
  architecture = "Qwen2ForCausalLM"

  refuses_sliding = True

  def config_from_hf(self, hf, source):
    return super().config_from_hf(hf, source) | dict(qkv_bias=True)

  def config_to_hf(self, cfg):
    out = super().config_to_hf(cfg)
    del out["attention_bias"], out["mlp_bias"]
    return out


LLAMA = base.register(Llama())
MISTRAL = base.register(Mistral())
QWEN2 = base.register(Qwen2())
