"""GGUF files (llama.cpp): the Llama and Qwen2 architectures, dequantized to float32 on
load."""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any

import gguf
import numpy as np

from jaxscore.models import model as model_lib
from jaxscore.models import weights

_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def gguf_reader(path: str | os.PathLike):
  path = pathlib.Path(path)
  if not path.exists():
    raise weights.CheckpointError(f"{path}: no such GGUF file")
  try:
    return gguf.GGUFReader(str(path))
  except Exception as e:  # The reader raises ValueError, struct.error, IndexError...
    raise weights.CheckpointError(
        f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def gguf_metadata(reader, key: str, default: Any = KeyError) -> Any:
  field = reader.fields.get(key)
  if field is None:
    if default is KeyError:
      raise weights.CheckpointError(f"{reader.data.filename}: GGUF metadata has no {key!r}")
    return default
  return field.contents()


def _unpermute_qk(w_RxD: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's interleaving of the rotary halves in Q/K rows."""
  half = w_RxD.shape[0] // n_head // 2
  return (w_RxD.reshape(n_head, half, 2, *w_RxD.shape[1:])
          .swapaxes(1, 2).reshape(w_RxD.shape))


def config_from_gguf(reader, **overrides) -> model_lib.ModelConfig:
  source = str(reader.data.filename)
  arch = gguf_metadata(reader, "general.architecture")
  if arch not in ("llama", "qwen2"):
    raise weights.CheckpointError(f"{source}: GGUF architecture {arch!r} is not supported "
                          "(llama, qwen2)")
  meta = lambda key, default=KeyError: gguf_metadata(reader, f"{arch}.{key}", default)
  names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in names:
    raise weights.CheckpointError(f"{source}: per-frequency RoPE factors (rope_freqs.weight) "
                          "are not supported; import the Hugging Face checkpoint instead")
  heads = meta("attention.head_count")
  vocab = meta("vocab_size", None)
  if vocab is None:
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
  embed_dim = meta("embedding_length")
  kwargs = dict(
      vocab_size=vocab,
      num_layers=meta("block_count"),
      embed_dim=embed_dim,
      num_heads=heads,
      num_kv_heads=meta("attention.head_count_kv", heads),
      mlp_dim=meta("feed_forward_length"),
      head_dim=meta("attention.key_length", embed_dim // heads),
      rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
      rope_theta=float(meta("rope.freq_base", 10_000.0)),
      family=arch,
      tie_embeddings="output.weight" not in names,
      qkv_bias=arch == "qwen2",
      sliding_window=None,
      max_position_embeddings=meta("context_length", 4096),
  )
  return model_lib.ModelConfig(**(kwargs | overrides))


def load_gguf(path: str | os.PathLike, *, param_dtype: str = "float32",
              dtype: str = "float32",
              reader=None) -> tuple[model_lib.ModelConfig, model_lib.Params]:
  """Loads (config, params) from a GGUF file, dequantizing to float32 first. `reader`:
  the file's `gguf_reader`, when the caller already opened it (parsing the metadata
  of a 49k-token vocabulary takes seconds)."""
  reader = reader or gguf_reader(path)
  cfg = config_from_gguf(reader, param_dtype=param_dtype, dtype=dtype)
  permute = gguf_metadata(reader, "general.architecture") == "llama"
  by_hf_name = {}
  for tensor in reader.tensors:
    name = tensor.name
    if name in _GGUF_NAMES:
      by_hf_name[_GGUF_NAMES[name]] = tensor
    elif name.startswith("blk."):
      _, i, rest = name.split(".", 2)
      if rest in _GGUF_LAYER_NAMES:
        by_hf_name[f"model.layers.{i}.{_GGUF_LAYER_NAMES[rest]}"] = tensor

  def get(hf_name):
    tensor = by_hf_name[hf_name]
    try:
      w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except Exception as e:
      raise weights.CheckpointError(f"{path}: cannot dequantize {tensor.name!r} "
                            f"({tensor.tensor_type.name}): {e}") from None
    w = weights.check_finite(np.asarray(w, np.float32), repr(tensor.name), str(path))
    if permute and hf_name.endswith("q_proj.weight"):
      w = _unpermute_qk(w, cfg.num_heads)
    elif permute and hf_name.endswith("k_proj.weight"):
      w = _unpermute_qk(w, cfg.num_kv_heads)
    return w

  display = lambda hf_name: repr(_gguf_name(hf_name))
  return cfg, weights.params_from_tensors(get, cfg, str(path), display)


def _gguf_name(hf_name: str) -> str:
  """The llama.cpp name of a Hugging Face tensor name."""
  for gguf_name, name in _GGUF_NAMES.items():
    if name == hf_name:
      return gguf_name
  layer, rest = re.fullmatch(r"model\.layers\.(\d+)\.(.*)", hf_name).groups()
  suffix = next(g for g, h in _GGUF_LAYER_NAMES.items() if h == rest)
  return f"blk.{layer}.{suffix}"


def stop_ids(reader) -> tuple[int, ...]:
  """The file's end-of-turn and end-of-message tokens, where it names them (the EOS
  is the tokenizer's own)."""
  ids = {gguf_metadata(reader, f"tokenizer.ggml.{key}_token_id", None)
         for key in ("eot", "eom")}
  return tuple(sorted(int(i) for i in ids if i is not None))
