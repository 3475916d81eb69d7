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
