"""Weights in and out: Hugging Face safetensors directories and GGUF files."""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxscore.models import model as model_lib

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_CONFIG = "config.json"
_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
  """A checkpoint is missing a tensor, has a wrong shape, or cannot be read."""


# ----------------------------------------------------------------------------
# Config <-> config.json


def config_from_hf(hf: Mapping[str, Any], source: str = _CONFIG,
                   **overrides) -> model_lib.ModelConfig:
  """ModelConfig from a Hugging Face `config.json` dict (transformers 4 or 5)."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise CheckpointError(
        f"{source}: model_type={model_type!r} is not supported; jaxscore "
        f"supports {', '.join(SUPPORTED_MODEL_TYPES)}")
  if hf.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{source}: hidden_act={hf['hidden_act']!r}; only silu")
  if hf.get("mlp_bias"):
    raise CheckpointError(f"{source}: mlp_bias=true is not supported")
  if model_type == "llama" and hf.get("attention_bias"):
    raise CheckpointError(f"{source}: attention_bias=true (o_proj bias) is not supported")
  layer_types = set(hf.get("layer_types") or ())
  if model_type == "qwen2" and (hf.get("use_sliding_window") or
                                "sliding_attention" in layer_types):
    raise CheckpointError(f"{source}: Qwen2 sliding-window layers are not supported")
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "default":
    scaling = None
  elif rope_type in ("llama3", "linear"):
    scaling = model_lib.RopeScaling(
        rope_type=rope_type,
        factor=float(rope["factor"]) if "factor" in rope else _missing(source, "factor"),
        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            rope.get("original_max_position_embeddings",
                     hf.get("max_position_embeddings", 8192))))
  else:
    raise CheckpointError(f"{source}: rope type {rope_type!r} is not supported "
                          "(default, llama3, linear)")
  missing = [k for k in ("num_attention_heads", "vocab_size", "num_hidden_layers",
                         "hidden_size", "intermediate_size") if k not in hf]
  if missing:
    raise CheckpointError(f"{source}: missing field {missing[0]!r}")
  heads = hf["num_attention_heads"]
  kwargs = dict(
      vocab_size=hf["vocab_size"],
      num_layers=hf["num_hidden_layers"],
      embed_dim=hf["hidden_size"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      mlp_dim=hf["intermediate_size"],
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      rope_theta=float(theta),
      rope_scaling=scaling,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=model_type == "qwen2",
      sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
      max_position_embeddings=hf.get("max_position_embeddings", 4096),
  )
  return model_lib.ModelConfig(**(kwargs | overrides))


def _missing(source: str, field: str):
  raise CheckpointError(f"{source}: rope scaling has no {field!r}")


def _check_finite(w: np.ndarray, name: str, source: str) -> np.ndarray:
  if not np.all(np.isfinite(w)):
    bad = int(np.size(w) - np.count_nonzero(np.isfinite(w)))
    raise CheckpointError(f"{source}: tensor {name} has {bad} non-finite values")
  return w


def config_to_hf(cfg: model_lib.ModelConfig, dtype: str = "float32") -> dict[str, Any]:
  """A config.json dict transformers loads as the matching architecture."""
  if cfg.qkv_bias:
    model_type, arch = "qwen2", "Qwen2ForCausalLM"
  elif cfg.sliding_window is not None:
    model_type, arch = "mistral", "MistralForCausalLM"
  else:
    model_type, arch = "llama", "LlamaForCausalLM"
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    rope = {"rope_type": s.rope_type, "rope_theta": cfg.rope_theta, "factor": s.factor}
    if s.rope_type == "llama3":
      rope |= {"low_freq_factor": s.low_freq_factor,
               "high_freq_factor": s.high_freq_factor,
               "original_max_position_embeddings": s.original_max_position_embeddings}
  hf = {
      "architectures": [arch],
      "model_type": model_type,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.embed_dim,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_parameters": rope,
      "tie_word_embeddings": cfg.tie_embeddings,
      "max_position_embeddings": cfg.max_position_embeddings,
      "torch_dtype": dtype,
      "dtype": dtype,
  }
  if model_type == "mistral":
    hf["sliding_window"] = cfg.sliding_window
  if model_type == "llama":
    hf |= {"attention_bias": False, "mlp_bias": False}
  return hf


# ----------------------------------------------------------------------------
# Tensor layout: Hugging Face names and shapes <-> jaxscore's params pytree.


def _tensor_specs(cfg: model_lib.ModelConfig) -> dict[str, tuple[str, tuple, Callable, Callable]]:
  """Per-layer and global tensors: our key -> (HF name, HF shape, to_ours, to_hf).

  HF names of per-layer tensors contain `{i}`.
  """
  d, n, k, h, f, v = (cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                      cfg.mlp_dim, cfg.vocab_size)
  ident = lambda w: w
  t = lambda w: w.T
  attn = "model.layers.{i}.self_attn."
  mlp = "model.layers.{i}.mlp."
  layer = {
      "attn_norm": ("model.layers.{i}.input_layernorm.weight", (d,), ident, ident),
      "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", (d,), ident, ident),
      "q": (attn + "q_proj.weight", (n * h, d),
            lambda w: w.T.reshape(d, n, h), lambda w: w.reshape(d, n * h).T),
      "k": (attn + "k_proj.weight", (k * h, d),
            lambda w: w.T.reshape(d, k, h), lambda w: w.reshape(d, k * h).T),
      "v": (attn + "v_proj.weight", (k * h, d),
            lambda w: w.T.reshape(d, k, h), lambda w: w.reshape(d, k * h).T),
      "o": (attn + "o_proj.weight", (d, n * h),
            lambda w: w.T.reshape(n, h, d), lambda w: w.reshape(n * h, d).T),
      "gate": (mlp + "gate_proj.weight", (f, d), t, t),
      "up": (mlp + "up_proj.weight", (f, d), t, t),
      "down": (mlp + "down_proj.weight", (d, f), t, t),
  }
  if cfg.qkv_bias:
    layer |= {
        "q_bias": (attn + "q_proj.bias", (n * h,), lambda w: w.reshape(n, h),
                   lambda w: w.reshape(n * h)),
        "k_bias": (attn + "k_proj.bias", (k * h,), lambda w: w.reshape(k, h),
                   lambda w: w.reshape(k * h)),
        "v_bias": (attn + "v_proj.bias", (k * h,), lambda w: w.reshape(k, h),
                   lambda w: w.reshape(k * h)),
    }
  glob = {
      "embed": ("model.embed_tokens.weight", (v, d), ident, ident),
      "final_norm": ("model.norm.weight", (d,), ident, ident),
  }
  if not cfg.tie_embeddings:
    glob["lm_head"] = ("lm_head.weight", (v, d), t, t)
  return {"layers": layer, **glob}


def params_from_tensors(get: Callable[[str], np.ndarray], cfg: model_lib.ModelConfig,
                        source: str, display: Callable[[str], str] = repr
                        ) -> model_lib.Params:
  """Builds params from HF-named tensors.

  Args:
    get: `get(hf_name)` returns the tensor in HF layout or raises KeyError.
    cfg: the architecture the tensors must fit.
    source: the file or directory named in errors.
    display: how errors spell a tensor name (e.g. its name in a GGUF file).
  """
  dtype = _np_dtype(cfg.param_dtype)
  specs = _tensor_specs(cfg)

  def fetch(name, shape, to_ours):
    try:
      w = np.asarray(get(name))
    except KeyError:
      raise CheckpointError(f"{source}: missing tensor {display(name)}") from None
    if w.shape != shape:
      raise CheckpointError(
          f"{source}: tensor {display(name)} has shape {w.shape}, expected "
          f"{shape} for this config")
    return to_ours(w.astype(np.float32)).astype(dtype)

  params: model_lib.Params = {"layers": {}}
  for key, (name, shape, to_ours, _) in specs["layers"].items():
    params["layers"][key] = np.stack(
        [fetch(name.format(i=i), shape, to_ours) for i in range(cfg.num_layers)])
  for key, spec in specs.items():
    if key != "layers":
      params[key] = fetch(*spec[:3])
  return params


def params_to_tensors(params: model_lib.Params, cfg: model_lib.ModelConfig,
                      dtype: str = "float32") -> dict[str, np.ndarray]:
  """HF-named numpy tensors (inverse of `params_from_tensors`)."""
  np_dtype = _np_dtype(dtype)
  specs = _tensor_specs(cfg)
  out = {}
  for key, (name, _, _, to_hf) in specs["layers"].items():
    stacked = np.asarray(params["layers"][key], np.float32)
    for i in range(cfg.num_layers):
      out[name.format(i=i)] = np.ascontiguousarray(to_hf(stacked[i]).astype(np_dtype))
  for key, spec in specs.items():
    if key != "layers":
      out[spec[0]] = np.ascontiguousarray(
          spec[3](np.asarray(params[key], np.float32)).astype(np_dtype))
  return out


def _np_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes  # A jax dependency.
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


# ----------------------------------------------------------------------------
# Hugging Face directories.


def _safetensors_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
  """Tensor name -> file, from the sharded index or by listing the files."""

  index = directory / _INDEX
  if index.exists():

    def no_duplicates(pairs):
      seen = {}
      for k, v in pairs:
        if k in seen:
          raise CheckpointError(f"{index}: tensor {k!r} is listed twice ({seen[k]}, {v})")
        seen[k] = v
      return seen

    try:
      weight_map = json.loads(index.read_text(), object_pairs_hook=no_duplicates)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
    files = {name: directory / f for name, f in weight_map.items()}
    for f in set(files.values()):
      if not f.exists():
        raise CheckpointError(f"{index}: lists {f.name}, which does not exist")
    return files
  shards = sorted(directory.glob("*.safetensors"))
  if not shards:
    raise CheckpointError(f"{directory}: no *.safetensors files")
  files = {}
  for shard in shards:
    for name in _open_safetensors(shard).keys():
      if name in files:
        raise CheckpointError(f"{shard}: tensor {name!r} is also in {files[name].name}")
      files[name] = shard
  return files


def _open_safetensors(path: pathlib.Path):
  from safetensors import safe_open

  try:
    return safe_open(str(path), framework="numpy")
  except Exception as e:  # SafetensorError, OSError: truncated or not safetensors.
    raise CheckpointError(f"{path}: not a readable safetensors file "
                          f"({type(e).__name__}: {e})") from None


def load_hf(directory: str | os.PathLike, *, param_dtype: str = "float32",
            dtype: str = "float32") -> tuple[model_lib.ModelConfig, model_lib.Params]:
  """Loads (config, params) from a Hugging Face checkpoint directory."""

  directory = pathlib.Path(directory)
  config_path = directory / _CONFIG
  if not config_path.exists():
    raise CheckpointError(f"{directory}: no {_CONFIG}")
  try:
    hf = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{config_path}: invalid JSON ({e})") from None
  cfg = config_from_hf(hf, str(config_path), param_dtype=param_dtype, dtype=dtype)
  files = _safetensors_files(directory)
  handles: dict[pathlib.Path, Any] = {}

  def get(name):
    path = files[name]  # KeyError -> missing tensor.
    if path not in handles:
      handles[path] = _open_safetensors(path)
    try:
      w = handles[path].get_tensor(name)
    except Exception as e:  # A truncated or damaged shard.
      raise CheckpointError(f"{path}: cannot read tensor {name!r} "
                            f"({type(e).__name__}: {e})") from None
    return _check_finite(np.asarray(w), repr(name), str(path))

  params = params_from_tensors(get, cfg, str(directory))
  return cfg, params


def save_hf(directory: str | os.PathLike, cfg: model_lib.ModelConfig,
            params: model_lib.Params, *, tokenizer=None, dtype: str = "float32") -> None:
  """Writes `config.json` + `model.safetensors` (+ tokenizer files) for transformers."""
  from safetensors.numpy import save_file

  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tensors = params_to_tensors(params, cfg, dtype)
  save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
  (directory / _CONFIG).write_text(json.dumps(config_to_hf(cfg, dtype), indent=2))
  if tokenizer is not None:
    tokenizer.save_pretrained(str(directory))


# ----------------------------------------------------------------------------
# GGUF.

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
  import gguf

  path = pathlib.Path(path)
  if not path.exists():
    raise CheckpointError(f"{path}: no such GGUF file")
  try:
    return gguf.GGUFReader(str(path))
  except Exception as e:  # The reader raises ValueError, struct.error, IndexError...
    raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def gguf_metadata(reader, key: str, default: Any = KeyError) -> Any:
  field = reader.fields.get(key)
  if field is None:
    if default is KeyError:
      raise CheckpointError(f"{reader.data.filename}: GGUF metadata has no {key!r}")
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
    raise CheckpointError(f"{source}: GGUF architecture {arch!r} is not supported "
                          "(llama, qwen2)")
  meta = lambda key, default=KeyError: gguf_metadata(reader, f"{arch}.{key}", default)
  names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in names:
    raise CheckpointError(f"{source}: per-frequency RoPE factors (rope_freqs.weight) "
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
  import gguf

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
      raise CheckpointError(f"{path}: cannot dequantize {tensor.name!r} "
                            f"({tensor.tensor_type.name}): {e}") from None
    w = _check_finite(np.asarray(w, np.float32), repr(tensor.name), str(path))
    if permute and hf_name.endswith("q_proj.weight"):
      w = _unpermute_qk(w, cfg.num_heads)
    elif permute and hf_name.endswith("k_proj.weight"):
      w = _unpermute_qk(w, cfg.num_kv_heads)
    return w

  display = lambda hf_name: repr(_gguf_name(hf_name))
  return cfg, params_from_tensors(get, cfg, str(path), display)


def _gguf_name(hf_name: str) -> str:
  """The llama.cpp name of a Hugging Face tensor name."""
  for gguf_name, name in _GGUF_NAMES.items():
    if name == hf_name:
      return gguf_name
  layer, rest = re.fullmatch(r"model\.layers\.(\d+)\.(.*)", hf_name).groups()
  suffix = next(g for g, h in _GGUF_LAYER_NAMES.items() if h == rest)
  return f"blk.{layer}.{suffix}"
