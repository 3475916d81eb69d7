"""Model families: one module each, found by `ModelConfig.family` or by a checkpoint's
`model_type`.

  family = families.get(cfg.family)
  family = families.for_model_type(hf_config["model_type"])

Built in: `llama` (Llama 2/3/3.1/3.2, SmolLM2), `mistral`, `qwen2`, `qwen3`, `gemma2`,
`gemma3` (text, and the text tower of multimodal checkpoints). A new family is one module
with a `base.Family` subclass passed to `register`; importing it makes it loadable.
"""

from jaxscore.models.families.base import (
                                           CheckpointError,
                                           Family,
                                           Tensor,
                                           for_model_type,
                                           get,
                                           model_types,
                                           names,
                                           register,
)

# Importing them registers the built-in families.
from jaxscore.models.families import gemma2, gemma3, llama, qwen3  # isort: skip

__all__ = ["CheckpointError", "Family", "Tensor", "for_model_type", "get", "model_types",
           "names", "register", "gemma2", "gemma3", "llama", "qwen3"]
