"""Episode formatting: segments must tokenize exactly like the chat template."""

import pytest
from conftest import require_embedded

from jaxscore.sampling import formats as chat_lib
from jaxscore.tasks import prompts

PROBLEM = "Tom has 3 apples and buys 4 more. How many apples does he have?"
ATTEMPTS = ["He has 3 + 4 = 8 apples.", "Let me recheck: 3 + 4 = 7. He has 7 apples."]


@pytest.fixture(scope="module")
def tokenizer():
  from jaxscore.models import tokenizer as tokenizer_lib

  return tokenizer_lib.load_tokenizer(require_embedded())


def test_chat_segments_equal_the_templates_tokens(tokenizer):
  fmt = chat_lib.ChatFormat(tokenizer)
  instr = [prompts.MATH_SELF_CORRECTION]
  # Turn 2's context: prompt, attempt 1, instruction, generation prompt.
  seg = fmt.encode_episode(PROBLEM, ATTEMPTS[:1], instr)
  ref = tokenizer.apply_chat_template(
      [{"role": "user", "content": PROBLEM}, {"role": "assistant", "content": ATTEMPTS[0]},
       {"role": "user", "content": instr[0]}], tokenize=True, add_generation_prompt=True)
  assert seg.ids() == list(_ids(ref))
  # The full episode, which the template closes with one newline after the last reply.
  seg = fmt.encode_episode(PROBLEM, ATTEMPTS, instr)
  full = fmt.render(PROBLEM, ATTEMPTS, instr)
  ref = tokenizer.encode(full, add_special_tokens=False)
  assert seg.ids() == ref[:len(seg.ids())]
  assert tokenizer.decode(ref[len(seg.ids()):]) == "\n"
  assert seg.attempts[0][-1] == fmt.end_of_turn_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_plain_segments_concatenate(tokenizer):
  fmt = chat_lib.PlainFormat(tokenizer, separator="\n\n")
  seg = fmt.encode_episode(PROBLEM, ATTEMPTS, ["Check it."])
  text = tokenizer.decode(seg.ids())
  assert text == PROBLEM + "\n\n" + ATTEMPTS[0] + "\n\nCheck it.\n\n" + ATTEMPTS[1]


def test_unknown_format_is_an_error(tokenizer):
  with pytest.raises(ValueError, match="format='xml'"):
    chat_lib.make_format(tokenizer, "xml")


def _ids(x):
  """apply_chat_template returns a list or a BatchEncoding depending on the version."""
  return x["input_ids"] if hasattr(x, "keys") else x


# ---------------------------------------------------------------------------
# Gemma's and Qwen3's turn structures (tests/hf_tiny.py builds their tokenizers).


@pytest.mark.parametrize("kind", ["gemma", "qwen3"])
def test_family_chat_exchange_tokenizes_like_apply_chat_template(kind):
  from hf_tiny import chat_tokenizer

  tok = chat_tokenizer(kind)
  fmt = chat_lib.ChatFormat(tok)
  instr = [prompts.MATH_SELF_CORRECTION]
  seg = fmt.encode_episode(PROBLEM, ATTEMPTS[:1], instr)
  ref = tok.apply_chat_template(
      [{"role": "user", "content": PROBLEM}, {"role": "assistant", "content": ATTEMPTS[0]},
       {"role": "user", "content": instr[0]}], tokenize=True, add_generation_prompt=True)
  assert seg.ids() == list(_ids(ref))
  eot = "<end_of_turn>" if kind == "gemma" else "<|im_end|>"
  assert seg.attempts[0][-1] == fmt.end_of_turn_id == tok.convert_tokens_to_ids(eot)
  # Self-Explore continues a partial assistant reply cut at a step boundary.
  partial = ATTEMPTS[1][:ATTEMPTS[1].index(". ") + 2]
  full = fmt.prompt_ids(PROBLEM) + fmt.attempt_ids(ATTEMPTS[1])
  assert full[:len(fmt.continuation_ids(PROBLEM, partial))] == \
      fmt.continuation_ids(PROBLEM, partial)


def test_a_template_without_a_system_role_gets_the_system_text_in_the_first_turn():
  from hf_tiny import chat_tokenizer

  tok = chat_tokenizer("gemma")
  with pytest.raises(Exception, match="System role not supported"):
    tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": PROBLEM}], tokenize=False)
  fmt = chat_lib.ChatFormat(tok, system="Be brief.")
  assert tok.decode(fmt.prompt_ids(PROBLEM)) == (
      f"<bos><start_of_turn>user\nBe brief.\n\n{PROBLEM}<end_of_turn>\n<start_of_turn>model\n")
  # A template with a system role keeps it as its own message.
  chatml = chat_lib.ChatFormat(chat_tokenizer("qwen3"), system="Be brief.")
  assert chatml.tokenizer.decode(chatml.prompt_ids(PROBLEM)).startswith(
      "<|im_start|>system\nBe brief.<|im_end|>")


def test_generation_config_stop_tokens_end_sampling(tmp_path):
  """Qwen3 stops on <|im_end|> and on <|endoftext|> (generation_config.json)."""
  import json

  from conftest import require_torch
  from hf_tiny import chat_tokenizer, make_hf_model

  from jaxscore.models import pretrained
  from jaxscore.sampling import formats, rollout

  require_torch()
  tok = chat_tokenizer("qwen3")
  make_hf_model("qwen3").save_pretrained(tmp_path)
  tok.save_pretrained(tmp_path)
  end = tok.convert_tokens_to_ids("<|endoftext|>")
  (tmp_path / "generation_config.json").write_text(json.dumps(
      {"eos_token_id": [tok.eos_token_id, end]}))
  model = pretrained.load(tmp_path)
  assert model.stop_ids == tuple(sorted({tok.eos_token_id, end}))
  setup = rollout.Setup(model.cfg, model.tokenizer, formats.ChatFormat(model.tokenizer),
                        None, model.stop_ids)
  assert end in setup.stop_ids and model.tokenizer.eos_token_id in setup.stop_ids
  assert rollout.make_sampler(setup, [8], 1, 4, message_len=0).stop_ids == \
      tuple(setup.stop_ids)
  (tmp_path / "generation_config.json").write_text('{"eos_token_id": "x"}')
  from jaxscore.models import weights

  with pytest.raises(weights.CheckpointError, match="generation_config.json: eos_token_id='x'"):
    pretrained.load(tmp_path)


def test_the_no_torch_notice_of_transformers_is_dropped_and_nothing_else():
  """jaxscore imports transformers for tokenizers: its "PyTorch was not found" line is
  noise to every user without torch; any other transformers message still shows."""
  import logging

  from jaxscore.models import tokenizer  # noqa: F401  (installs the filter)

  seen = []

  class Keep(logging.Handler):
    def emit(self, record):
      seen.append(record.getMessage())

  logger = logging.getLogger("transformers")
  handler = Keep()
  logger.addHandler(handler)
  try:
    logger.warning("PyTorch was not found. Models won't be available and only tokenizers, "
                   "configuration and file/data utilities can be used.")
    logger.warning("Token indices sequence length is longer than the maximum")
  finally:
    logger.removeHandler(handler)
  assert seen == ["Token indices sequence length is longer than the maximum"]
