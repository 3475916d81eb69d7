"""The architecture and numerics of a decoder, for every model family.

A family (jaxscore.models.families) maps a checkpoint's `config.json` to these fields and
chooses its layer's parameters and block; everything else (the scanned stack, the KV
cache, sliding windows, RoPE, soft-capping, sharding, remat) reads only these fields.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3 (`llama3`) or position-interpolation (`linear`) RoPE scaling."""

  rope_type: str = "llama3"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# How QLoRA stores the frozen base's projections: none (param_dtype), int8 (absmax
# blocks), nf4 (4-bit NormalFloat blocks, the QLoRA paper's type).
QUANT_TYPES = ("none", "int8", "nf4")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 0  # 0: no adapters (full fine-tuning).
  alpha: float = 16.0  # The update is scaled by alpha / rank.
  targets: str = "q,k,v,o,gate,up,down"  # Comma-separated: q, k, v, o, gate, up, down.
  # QLoRA: every projection of the frozen base (all seven, adapted or not) stored as
  # `quantize` in blocks of `quant_block` along its input axis, one absmax scale each,
  # and dequantized inside its matmul; the adapters stay in param_dtype.
  quantize: str = "none"
  quant_block: int = 64

  def __post_init__(self):
    if self.rank < 0:
      raise ValueError(f"lora.rank={self.rank}: expected >= 0 (0: off)")
    if self.quantize not in QUANT_TYPES:
      raise ValueError(f"lora.quantize={self.quantize!r}: expected one of "
                       f"{', '.join(QUANT_TYPES)}")
    if self.quant_block <= 0:
      raise ValueError(f"lora.quant_block={self.quant_block}: expected > 0")
    if self.quantize != "none" and not self.rank:
      raise ValueError(f"lora.quantize={self.quantize!r} needs lora.rank > 0: a quantized "
                       "base is frozen, only adapters can be trained on it")
    unknown = [t for t in self.target_names if t not in LORA_TARGETS]
    if unknown or (self.rank and not self.target_names):
      raise ValueError(f"lora.targets={self.targets!r}: expected a comma-separated subset "
                       f"of {', '.join(LORA_TARGETS)}")

  @property
  def target_names(self) -> tuple[str, ...]:
    return tuple(t.strip() for t in self.targets.split(",") if t.strip())

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


REMAT_POLICIES = ("none", "full", "dots")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of a decoder of family `family`."""

  vocab_size: int
  num_layers: int
  embed_dim: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  # The registered family (jaxscore.models.families): its layer parameters, block,
  # tensor names and config.json mapping.
  family: str = "llama"
  head_dim: int | None = None  # None: embed_dim // num_heads.
  rms_norm_eps: float = 1e-5
  # RMSNorm multiplies by (norm_offset + w): 0 in Llama, 1 in Gemma (weights stored
  # around 0), so a zero-initialised norm is the identity there.
  norm_offset: float = 0.0
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  # RoPE base of the sliding-window layers (Gemma 3: 10k locally, rope_theta globally);
  # None: the same as every other layer, unscaled only where rope_scaling is None.
  local_rope_theta: float | None = None
  tie_embeddings: bool = False
  scale_embeddings: bool = False  # Gemma: embeddings times sqrt(embed_dim).
  qkv_bias: bool = False  # Qwen2.
  qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm of each query and key head before RoPE.
  mlp_activation: str = "silu"  # silu (SwiGLU) | gelu_tanh (GeGLU, Gemma).
  # Attention logits are scaled by query_pre_attn_scalar**-0.5 (Gemma), else head_dim**-0.5.
  query_pre_attn_scalar: float | None = None
  attn_softcap: float | None = None  # cap * tanh(logits / cap) on attention logits (Gemma 2).
  final_softcap: float | None = None  # ... and on the output logits (Gemma 2).
  sliding_window: int | None = None  # A key is seen while q - k < window.
  # Which layers use `sliding_window` (Gemma's local/global pattern); None: all of them
  # when sliding_window is set (Mistral).
  sliding_layers: tuple[bool, ...] | None = None
  max_position_embeddings: int = 4096
  param_dtype: str = "float32"
  dtype: str = "float32"  # Compute dtype; softmax and norms always run in float32.
  # What the backward pass keeps of each scanned layer (training memory, not results):
  # none (every activation), full (only the layer's input; the rest is recomputed),
  # dots (the weight matmuls' outputs; norms, RoPE, attention and SiLU are recomputed).
  remat: str = "none"
  # Per-token log-probs from logits `logits_chunk` positions at a time, so the
  # B x T x vocabulary float32 logits never exist at once (backward pass included);
  # 0 computes them all at once.
  logits_chunk: int = 0
  # Low-rank adapters (jaxscore.models.lora) the params may carry beside the weights;
  # None or rank 0: none.
  lora: LoraConfig | None = None

  def __post_init__(self):
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.embed_dim // self.num_heads)
    if self.sliding_layers is not None:
      object.__setattr__(self, "sliding_layers", tuple(bool(s) for s in self.sliding_layers))
      if len(self.sliding_layers) != self.num_layers:
        raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries for "
                         f"num_layers={self.num_layers}")
      if any(self.sliding_layers) and self.sliding_window is None:
        raise ValueError("sliding_layers marks sliding layers but sliding_window is None")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of "
          f"num_kv_heads={self.num_kv_heads}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}: expected one of {', '.join(REMAT_POLICIES)}")
    if self.mlp_activation not in MLP_ACTIVATIONS:
      raise ValueError(f"mlp_activation={self.mlp_activation!r}: expected one of "
                       f"{', '.join(MLP_ACTIVATIONS)}")
    if self.logits_chunk < 0:
      raise ValueError(f"logits_chunk={self.logits_chunk}: expected >= 0 (0: no chunks)")
    for field in ("param_dtype", "dtype"):
      if getattr(self, field) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{field}={getattr(self, field)!r}: expected float32, "
                         "bfloat16 or float16")

  def replace(self, **kwargs) -> ModelConfig:
    return dataclasses.replace(self, **kwargs)

  @property
  def lora_scale(self) -> float | None:
    """alpha / rank of the adapters, or None without them."""
    return self.lora.scale if self.lora is not None and self.lora.rank else None

  @property
  def quantize(self) -> str:
    """How the frozen base's projections are stored (`LoraConfig.quantize`)."""
    return self.lora.quantize if self.lora_scale is not None else "none"

  @property
  def layer_is_sliding(self) -> tuple[bool, ...]:
    """Per layer: does it attend through `sliding_window`?"""
    if self.sliding_window is None:
      return (False,) * self.num_layers
    return self.sliding_layers or (True,) * self.num_layers
