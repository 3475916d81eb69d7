"""Published model shapes by name, for random-weight benchmarks, ahead-of-time compiles
and memory plans that need no checkpoint.

  cfg = shapes.config("gemma3-4b", param_dtype="bfloat16", dtype="bfloat16")

Each entry is the `config.json` of the released checkpoint (the fields that shape the
model), read by its family exactly as a downloaded checkpoint would be.
"""

from __future__ import annotations

import math
from typing import Any

import jax

from jaxscore.models import model as model_lib
from jaxscore.models import weights

_GEMMA3 = dict(model_type="gemma3_text", head_dim=256, query_pre_attn_scalar=256,
               rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
               sliding_window_pattern=6, rms_norm_eps=1e-6, tie_word_embeddings=True)
_QWEN3 = dict(model_type="qwen3", head_dim=128, vocab_size=151_936, rope_theta=1_000_000.0,
              rms_norm_eps=1e-6, max_position_embeddings=40_960)

NAMED: dict[str, dict[str, Any]] = {
    # google/gemma-3-1b-it (text only).
    "gemma3-1b": _GEMMA3 | dict(vocab_size=262_144, hidden_size=1152, intermediate_size=6912,
                                num_hidden_layers=26, num_attention_heads=4,
                                num_key_value_heads=1, sliding_window=512,
                                max_position_embeddings=32_768),
    # google/gemma-3-4b-it and -12b-it: the text tower (global RoPE scaled 8x).
    "gemma3-4b": _GEMMA3 | dict(vocab_size=262_208, hidden_size=2560, intermediate_size=10_240,
                                num_hidden_layers=34, num_attention_heads=8,
                                num_key_value_heads=4, sliding_window=1024,
                                rope_scaling={"rope_type": "linear", "factor": 8.0},
                                max_position_embeddings=131_072),
    "gemma3-12b": _GEMMA3 | dict(vocab_size=262_208, hidden_size=3840,
                                 intermediate_size=15_360, num_hidden_layers=48,
                                 num_attention_heads=16, num_key_value_heads=8,
                                 sliding_window=1024,
                                 rope_scaling={"rope_type": "linear", "factor": 8.0},
                                 max_position_embeddings=131_072),
    # Qwen/Qwen3-0.6B and Qwen/Qwen3-8B.
    "qwen3-0.6b": _QWEN3 | dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                num_attention_heads=16, num_key_value_heads=8,
                                tie_word_embeddings=True),
    "qwen3-8b": _QWEN3 | dict(hidden_size=4096, intermediate_size=12_288, num_hidden_layers=36,
                              num_attention_heads=32, num_key_value_heads=8,
                              tie_word_embeddings=False),
    # meta-llama/Llama-3.1-8B-Instruct.
    "llama3.1-8b": dict(model_type="llama", vocab_size=128_256, hidden_size=4096,
                        intermediate_size=14_336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500_000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192},
                        max_position_embeddings=131_072, tie_word_embeddings=False),
}


def config(name: str, **overrides) -> model_lib.ModelConfig:
  """The ModelConfig of a named shape; `overrides` set dtypes and memory options."""
  if name not in NAMED:
    raise ValueError(f"unknown model shape {name!r} (shapes: {', '.join(NAMED)})")
  return weights.config_from_hf(NAMED[name], f"shape {name!r}", **overrides)


def num_params(cfg: model_lib.ModelConfig) -> int:
  """Parameters of `cfg`, counted from the shapes alone."""
  return sum(math.prod(s) for s in jax.tree.leaves(
      model_lib.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)))
