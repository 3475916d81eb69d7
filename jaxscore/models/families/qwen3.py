"""Qwen3 (dense): the Llama block with an RMSNorm on every query and key head before
RoPE, no q/k/v biases, and an explicit head_dim."""

from __future__ import annotations

from jaxscore.models.families import base, llama


class Qwen3(llama.Llama):
  name = "qwen3"
  model_types = ("qwen3",)
  architecture = "Qwen3ForCausalLM"
  refuses_sliding = True

  def config_from_hf(self, hf, source):
    return super().config_from_hf(hf, source) | dict(qk_norm=True)

  def config_to_hf(self, cfg):
    out = super().config_to_hf(cfg) | {"use_sliding_window": False}
    del out["mlp_bias"]
    return out


QWEN3 = base.register(Qwen3())
