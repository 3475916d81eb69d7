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
    # head_dim differs from hidden / heads, as in the released Qwen3 models.
    "qwen3": dict(model_type="qwen3", num_key_value_heads=2, head_dim=24,
                  tie_word_embeddings=False),
    # Soft-caps small enough to bind on random weights; layers alternate sliding (5
    # tokens) and global; the attention scale differs from head_dim**-0.5.
    "gemma2": dict(model_type="gemma2", num_key_value_heads=2, head_dim=16,
                   query_pre_attn_scalar=24, sliding_window=5, attn_logit_softcapping=2.0,
                   final_logit_softcapping=3.0),
    # Three layers: sliding, sliding, global (the 5:1 pattern, shortened); the global
    # layer's RoPE is scaled and has its own base.
    "gemma3": dict(model_type="gemma3_text", num_key_value_heads=1, head_dim=16,
                   query_pre_attn_scalar=20, sliding_window=5, num_hidden_layers=3,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                   rope_parameters={
                       "full_attention": {"rope_type": "linear", "factor": 4.0,
                                          "rope_theta": 1_000_000.0},
                       "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
}
SLIDING = ("mistral", "gemma2", "gemma3")


def make_hf_model(family: str, seed: int = 0):
  """A random 2- or 3-layer model of `family`, every weight drawn from N(0, 0.2)."""
  import torch
  import transformers

  kwargs = dict(FAMILIES[family])
  model_type = kwargs.pop("model_type")
  rope_scaling = kwargs.pop("rope_scaling", None)
  config_cls = transformers.AutoConfig.for_model(model_type).__class__
  kwargs = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5) | kwargs
  config = config_cls(attn_implementation="eager", **kwargs)
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


# ---------------------------------------------------------------------------
# Tokenizers with each family's turn structure, written here from the families' documented
# chat formats (Gemma: <start_of_turn>role ... <end_of_turn>, no system role; Qwen: ChatML).

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAT_TOKENS = {
    "gemma": dict(template=GEMMA_TEMPLATE, bos="<bos>", eos="<eos>", pad="<pad>",
                  special=["<start_of_turn>", "<end_of_turn>"]),
    "qwen3": dict(template=CHATML_TEMPLATE, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                  special=["<|im_start|>"]),
}


def chat_tokenizer(kind: str):
  """A byte-level tokenizer (one token per byte, no merges) with `kind`'s special tokens
  and chat template."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  spec = CHAT_TOKENS[kind]
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  tok = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)},
                                        merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  named = [t for t in (spec["bos"], spec["eos"], spec["pad"]) if t] + spec["special"]
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t in named])
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec["bos"],
                                 eos_token=spec["eos"], pad_token=spec["pad"],
                                 chat_template=spec["template"])
