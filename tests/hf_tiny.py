"""Tiny random transformers checkpoints (PyTorch) for parity tests."""

import numpy as np

FAMILIES = {
    "llama": dict(model_type="llama", num_key_value_heads=2),
    "llama-tied": dict(model_type="llama", num_key_value_heads=4, tie_word_embeddings=True),
    "llama3-rope": dict(
        model_type="llama", num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2, tie_word_embeddings=False),
    "mistral": dict(model_type="mistral", num_key_value_heads=1, sliding_window=5,
                    head_dim=24),
}


def make_hf_model(family: str, seed: int = 0):
  """A random 2-layer model of `family`, every weight drawn from N(0, 0.2)."""
  import torch
  import transformers

  kwargs = dict(FAMILIES[family])
  model_type = kwargs.pop("model_type")
  rope_scaling = kwargs.pop("rope_scaling", None)
  config_cls = transformers.AutoConfig.for_model(model_type).__class__
  config = config_cls(
      vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5,
      attn_implementation="eager", **kwargs)
  if rope_scaling is not None:
    config.rope_parameters = {"rope_theta": kwargs["rope_theta"], **rope_scaling}
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  return model


def hf_logits(model, tokens_BxT: np.ndarray, mask_BxT: np.ndarray) -> np.ndarray:
  import torch

  mask = torch.tensor(mask_BxT, dtype=torch.long)
  positions = (mask.cumsum(-1) - 1).clamp(min=0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens_BxT, dtype=torch.long),
                attention_mask=mask, position_ids=positions)
  return out.logits.float().numpy()


def padded_batch(vocab: int, seed: int = 0):
  """Three rows: full, right-padded and left-padded."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, size=(3, 12))
  mask = np.ones((3, 12), np.int32)
  mask[1, 7:] = 0
  mask[2, :4] = 0
  return tokens, mask
