"""Gemma 2: embeddings scaled by sqrt(width), RMSNorm with (1 + w), a norm before and
after attention and the MLP, GeGLU (gelu tanh), attention scaled by
query_pre_attn_scalar**-0.5, soft-capped attention and output logits, and sliding-window
and global layers alternating inside one scanned stack."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from jaxscore.models import layers
from jaxscore.models.config import ModelConfig
from jaxscore.models.families import base

_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")


def sandwich_block(x_BxTxD, lp, cfg: ModelConfig, positions_BxT, inv_freq_H2, attend):
  """x + post_norm(attn(norm(x))), then x + post_norm(mlp(norm(x)))."""
  norm = lambda x, w: layers.rms_norm(x, w, cfg.rms_norm_eps, cfg.norm_offset)
  q, k, v = layers.qkv(norm(x_BxTxD, lp["attn_norm"]), lp, cfg, positions_BxT, inv_freq_H2)
  attn_BxTxQxH, extra = attend(q, k, v)
  x_BxTxD = x_BxTxD + norm(layers.out_proj(attn_BxTxQxH, lp, cfg), lp["post_attn_norm"])
  h = layers.gated_mlp(norm(x_BxTxD, lp["mlp_norm"]), lp, cfg)
  x_BxTxD = x_BxTxD + norm(h, lp["post_mlp_norm"])
  return nn.with_logical_constraint(x_BxTxD, layers.ACT_EMBED), extra


class Gemma2(base.Family):
  name = "gemma2"
  model_types = ("gemma2",)
  architecture = "Gemma2ForCausalLM"
  # Hugging Face Gemma configs leave out fields that equal their class defaults.
  defaults = dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                  attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
  sliding_pattern = 2  # Without layer_types: layers i with (i + 1) % pattern != 0 slide.

  def check(self, hf: Mapping[str, Any], source: str) -> None:
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in _ACTIVATIONS:
      raise base.CheckpointError(f"{source}: hidden_activation={act!r}; only "
                                 "gelu_pytorch_tanh")
    if hf.get("attention_bias"):
      raise base.CheckpointError(f"{source}: attention_bias=true is not supported")
    if hf.get("use_bidirectional_attention"):
      raise base.CheckpointError(f"{source}: use_bidirectional_attention=true (an "
                                 "encoder) is not a causal language model")

  def rope_fields(self, hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta, scaling = base.parse_rope(rope, hf.get("rope_theta", 10_000.0), source)
    return dict(rope_theta=theta, rope_scaling=scaling)

  def config_from_hf(self, hf, source):
    self.check(hf, source)
    hf = {**self.defaults, **hf}
    fields = base.common_fields(hf, source)
    n = fields["num_layers"]
    default = [bool((i + 1) % hf.get("sliding_window_pattern", self.sliding_pattern))
               for i in range(n)]
    sliding = base.sliding_from_layer_types(hf, n, source, default)
    return fields | self.rope_fields(hf, source) | dict(
        family=self.name, norm_offset=1.0, scale_embeddings=True,
        mlp_activation="gelu_tanh", query_pre_attn_scalar=hf["query_pre_attn_scalar"],
        attn_softcap=hf.get("attn_logit_softcapping"),
        final_softcap=hf.get("final_logit_softcapping"),
        sliding_window=hf["sliding_window"] if any(sliding) else None,
        sliding_layers=sliding if any(sliding) else None,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)))

  def config_to_hf(self, cfg):
    return {**base.common_to_hf(cfg), "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
            "sliding_window": cfg.sliding_window or self.defaults["sliding_window"],
            "layer_types": base.layer_types_to_hf(cfg),
            "attn_logit_softcapping": cfg.attn_softcap,
            "final_logit_softcapping": cfg.final_softcap,
            "rope_parameters": base.rope_to_hf(cfg.rope_theta, cfg.rope_scaling)}

  def layer_axes(self, cfg):
    norm = ("layers", "norm")
    return {"attn_norm": norm, "post_attn_norm": norm, "mlp_norm": norm,
            "post_mlp_norm": norm, **layers.attention_axes(cfg), **layers.MLP_AXES}

  def layer_tensors(self, cfg):
    d, p = cfg.embed_dim, "model.layers.{i}."
    return {"attn_norm": base.Tensor(p + "input_layernorm.weight", (d,)),
            "post_attn_norm": base.Tensor(p + "post_attention_layernorm.weight", (d,)),
            "mlp_norm": base.Tensor(p + "pre_feedforward_layernorm.weight", (d,)),
            "post_mlp_norm": base.Tensor(p + "post_feedforward_layernorm.weight", (d,)),
            **base.attention_tensors(cfg), **base.mlp_tensors(cfg)}

  def block(self, x_BxTxD, lp, cfg, positions_BxT, inv_freq_H2, attend):
    return sandwich_block(x_BxTxD, lp, cfg, positions_BxT, inv_freq_H2, attend)


GEMMA2 = base.register(Gemma2())
