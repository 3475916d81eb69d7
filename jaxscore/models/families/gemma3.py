"""Gemma 3 (text; `gemma3_text`, and the text tower of the multimodal `gemma3`
checkpoints): Gemma 2's block with an RMSNorm on every query and key head, the
local/global pattern from `layer_types` (5 local to 1 global), separate RoPE bases for
local and global layers (global RoPE scaling), and no soft-capping."""

from __future__ import annotations

from jaxscore.models.families import base, gemma2


class Gemma3(gemma2.Gemma2):
  name = "gemma3"
  model_types = ("gemma3_text", "gemma3")
  architecture = "Gemma3ForCausalLM"
  defaults = dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                  vocab_size=262_208, attn_logit_softcapping=None,
                  final_logit_softcapping=None)
  sliding_pattern = 6
  # Where the text tower's tensors sit: a text checkpoint, then the multimodal ones as
  # transformers 5 and the Hub's original files name them.
  checkpoint_prefixes = ("model.", "model.language_model.", "language_model.model.")

  def config_from_hf(self, hf, source):
    if hf.get("model_type") == "gemma3":  # Multimodal: the text tower's config.
      hf = dict(hf.get("text_config") or {})
      source = f"{source} (text_config)"
    return super().config_from_hf(hf, source) | dict(qk_norm=True)

  def rope_fields(self, hf, source):
    rope = hf.get("rope_parameters")
    if rope and "full_attention" in rope:  # transformers 5: one dict per layer type.
      full, local = dict(rope["full_attention"]), dict(rope.get("sliding_attention") or {})
    else:  # transformers 4: rope_theta, rope_local_base_freq and rope_scaling.
      full = dict(hf.get("rope_scaling") or {}) | {"rope_theta": hf.get("rope_theta", 1e6)}
      local = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
    theta, scaling = base.parse_rope(full, 1e6, source)
    local_theta, local_scaling = base.parse_rope(local, 10_000.0, source)
    if local_scaling is not None:
      raise base.CheckpointError(f"{source}: scaled RoPE on sliding layers is not supported")
    return dict(rope_theta=theta, rope_scaling=scaling, local_rope_theta=local_theta)

  def config_to_hf(self, cfg):
    out = super().config_to_hf(cfg)
    out["rope_parameters"] = {
        "full_attention": base.rope_to_hf(cfg.rope_theta, cfg.rope_scaling),
        "sliding_attention": base.rope_to_hf(cfg.local_rope_theta or cfg.rope_theta, None)}
    return out


GEMMA3 = base.register(Gemma3())
