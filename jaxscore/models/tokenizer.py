"""Tokenizers: transformers' AutoTokenizer for HF directories, GGUF metadata otherwise.

Both paths return a `transformers.PreTrainedTokenizerFast`, so `encode`, `decode` and
`apply_chat_template` behave the same for every model. The GGUF path builds the
tokenizer with the `tokenizers` library from the file's vocabulary, merges, token types
and chat template, so it needs no torch.
"""

from __future__ import annotations

import logging
import os
import pathlib

from jaxscore.models import gguf_checkpoint, weights


class _NoTorchNotice(logging.Filter):
  """transformers announces at import that PyTorch is missing ("Models won't be
  available"); jaxscore imports it for tokenizers only, where that is expected, so that
  one line is dropped. Every other transformers message passes."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("PyTorch was not found")


# Installed before this module first imports transformers (its library root logger).
logging.getLogger("transformers").addFilter(_NoTorchNotice())

# llama.cpp pre-tokenizer names whose split differs from GPT-2's byte-level regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_CONTROL = 3  # llama.cpp token type of special tokens such as <|im_end|>.
_USER_DEFINED = 4


def load_tokenizer(path: str | os.PathLike, gguf_reader=None):
  """Tokenizer of a Hugging Face directory or a GGUF file (`gguf_reader`: the file's
  reader, when the caller already opened it)."""
  path = pathlib.Path(path)
  if path.suffix == ".gguf":
    return tokenizer_from_gguf(gguf_reader or gguf_checkpoint.gguf_reader(path))
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(str(path))


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character map."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars = list(printable)
  extra = 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + extra)
      extra += 1
  return dict(zip(printable, map(chr, chars)))


def tokenizer_from_gguf(reader):
  """A byte-level BPE tokenizer (llama.cpp model `gpt2`) from GGUF metadata."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  source = str(reader.data.filename)
  meta = lambda key, default=KeyError: gguf_checkpoint.gguf_metadata(reader, key, default)
  kind = meta("tokenizer.ggml.model")
  if kind != "gpt2":
    raise weights.CheckpointError(
        f"{source}: tokenizer.ggml.model={kind!r}; only byte-level BPE ('gpt2') "
        "tokenizers are built from GGUF. Use the model's Hugging Face directory.")
  tokens = meta("tokenizer.ggml.tokens")
  token_types = meta("tokenizer.ggml.token_type", [1] * len(tokens))
  merges = [tuple(m.split(" ", 1)) for m in meta("tokenizer.ggml.merges")]
  alphabet = set(_bytes_to_unicode().values())
  spell = _bytes_to_unicode()
  # Tokens outside the byte alphabet (e.g. raw-spelled added tokens) are respelled.
  vocab = {tok if set(tok) <= alphabet else "".join(spell[b] for b in tok.encode()): i
           for i, tok in enumerate(tokens)}
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
  split = _PRE_TOKENIZER_SPLITS.get(meta("tokenizer.ggml.pre", None))
  if split is None:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  else:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  special = [tokenizers.AddedToken(t, special=True, normalized=False)
             for t, kind in zip(tokens, token_types)
             if kind == _CONTROL and set(t) <= alphabet]
  tok.add_special_tokens(special)
  tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                  for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED])

  def token(key):
    index = meta(f"tokenizer.ggml.{key}", None)
    return tokens[index] if index is not None else None

  return PreTrainedTokenizerFast(
      tokenizer_object=tok,
      bos_token=token("bos_token_id"),
      eos_token=token("eos_token_id"),
      unk_token=token("unknown_token_id"),
      pad_token=token("padding_token_id"),
      chat_template=meta("tokenizer.chat_template", None),
      add_bos_token=bool(meta("tokenizer.ggml.add_bos_token", False)),
      add_eos_token=bool(meta("tokenizer.ggml.add_eos_token", False)),
  )
