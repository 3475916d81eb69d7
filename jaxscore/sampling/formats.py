"""Turning multi-turn episodes into token ids: chat templates or plain concatenation.

An episode is `problem, attempt_1, instruction, attempt_2, ...`. The sampler generates the
attempts itself, so it needs the other pieces as token segments: the first prompt, and the
tokens that follow an attempt to open the next turn. `ChatFormat` derives those from the
tokenizer's chat template; `encode_episode` gives the whole episode as segments, so a
trainer rebuilding a transcript gets the same ids as the sampler produced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

_PROBE = "\x00attempt\x00"  # Stands in for an attempt while slicing rendered templates.


@dataclasses.dataclass(frozen=True)
class Segments:
  """Token ids of an episode, piece by piece."""

  prompt: list[int]
  attempts: list[list[int]]  # Each ends with the end-of-turn token, if the format has one.
  instructions: list[list[int]]  # instructions[t] opens the turn after attempt t.

  def ids(self) -> list[int]:
    out = list(self.prompt)
    for t, attempt in enumerate(self.attempts):
      out += attempt
      if t < len(self.instructions):
        out += self.instructions[t]
    return out


class _Format:
  """What both formats share: an episode from its pieces, and partial replies."""

  def continuation_ids(self, problem: str, partial_reply: str) -> list[int]:
    """The first prompt and the start of a reply, for the model to continue that reply.

    Cut at a step boundary (after a newline or a sentence's trailing space), these are
    the same tokens as the full reply's encoding up to that point.
    """
    return self.prompt_ids(problem) + self.tokenizer.encode(partial_reply,
                                                            add_special_tokens=False)

  def encode_episode(self, problem: str, attempts: Sequence[str],
                     instructions: Sequence[str]) -> Segments:
    return Segments(
        prompt=self.prompt_ids(problem),
        attempts=[self.attempt_ids(a) for a in attempts],
        instructions=[self.instruction_ids(p) for p in instructions[:len(attempts)]])


def _is_special(tokenizer: Any, token_id: int) -> bool:
  """A named special token, or an added one marked special (Gemma's <end_of_turn> need
  not be among the named ones)."""
  added = getattr(tokenizer, "added_tokens_decoder", {}).get(token_id)
  return token_id in tokenizer.all_special_ids or bool(added is not None and added.special)


class ChatFormat(_Format):
  """Episodes through a tokenizer's chat template (user / assistant alternation)."""

  def __init__(self, tokenizer: Any, system: str | None = None):
    if not getattr(tokenizer, "chat_template", None):
      raise ValueError("the tokenizer has no chat template; use PlainFormat")
    self.tokenizer = tokenizer
    self.system = system
    # Templates without a system role (Gemma 2's refuses one) get the system text at the
    # head of the first user turn, which is where Gemma 3's own template puts it.
    self._system_in_user = bool(system) and not self._takes_system_role()
    self.end_of_turn_id, self._after_eot = self._end_of_turn()

  def _takes_system_role(self) -> bool:
    try:
      self._render([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                   True)
    except Exception:  # jinja2's TemplateError from the template's raise_exception.
      return False
    return True

  def _messages(self, problem, attempts, instructions):
    msgs = []
    if self.system and self._system_in_user:
      problem = f"{self.system}\n\n{problem}"
    elif self.system:
      msgs.append({"role": "system", "content": self.system})
    msgs.append({"role": "user", "content": problem})
    for t, attempt in enumerate(attempts):
      msgs.append({"role": "assistant", "content": attempt})
      if t < len(instructions):
        msgs.append({"role": "user", "content": instructions[t]})
    return msgs

  def _render(self, messages, generation_prompt: bool) -> str:
    return self.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt)

  def _end_of_turn(self) -> tuple[int | None, str]:
    """The token that closes an assistant reply, and the text between it and the next turn."""
    with_reply = self._render(self._messages("q", [_PROBE], []), False)
    after = with_reply[with_reply.index(_PROBE) + len(_PROBE):]
    ids = self.tokenizer.encode(after, add_special_tokens=False)
    if ids and _is_special(self.tokenizer, ids[0]):
      eot = ids[0]
      return eot, after[len(self.tokenizer.decode([eot])):]
    return None, after

  def prompt_ids(self, problem: str) -> list[int]:
    text = self._render(self._messages(problem, [], []), True)
    return self.tokenizer.encode(text, add_special_tokens=False)

  def instruction_ids(self, instruction: str) -> list[int]:
    """Tokens after an attempt's end-of-turn token that open the next turn."""
    full = self._render(self._messages("q", [_PROBE], [instruction]), True)
    start = full.index(_PROBE) + len(_PROBE)
    rest = full[start:]
    if self.end_of_turn_id is not None:
      eot_text = self.tokenizer.decode([self.end_of_turn_id])
      if not rest.startswith(eot_text):
        raise ValueError(f"chat template does not close a reply with {eot_text!r}")
      rest = rest[len(eot_text):]
    return self.tokenizer.encode(rest, add_special_tokens=False)

  def attempt_ids(self, attempt: str) -> list[int]:
    ids = self.tokenizer.encode(attempt, add_special_tokens=False)
    return ids + ([self.end_of_turn_id] if self.end_of_turn_id is not None else [])

  def render(self, problem: str, attempts: Sequence[str], instructions: Sequence[str]) -> str:
    """The template's own rendering of the episode (for transcripts and checks)."""
    gen = len(instructions) >= len(attempts)
    return self._render(self._messages(problem, list(attempts), list(instructions)), gen)


class PlainFormat(_Format):
  """Episodes of a base model: plain concatenation with a separator."""

  end_of_turn_id = None

  def __init__(self, tokenizer: Any, separator: str = "\n\n"):
    self.tokenizer = tokenizer
    self.separator = separator

  def prompt_ids(self, problem: str) -> list[int]:
    return self.tokenizer.encode(problem + self.separator, add_special_tokens=True)

  def instruction_ids(self, instruction: str) -> list[int]:
    text = self.separator + instruction + self.separator
    return self.tokenizer.encode(text, add_special_tokens=False)

  def attempt_ids(self, attempt: str) -> list[int]:
    return self.tokenizer.encode(attempt, add_special_tokens=False)


def make_format(tokenizer: Any, kind: str = "chat", **kwargs) -> ChatFormat | PlainFormat:
  """`chat` (the tokenizer's template) or `plain` (concatenation)."""
  if kind == "chat":
    return ChatFormat(tokenizer, **kwargs)
  if kind == "plain":
    return PlainFormat(tokenizer, **kwargs)
  raise ValueError(f"format={kind!r}: expected 'chat' or 'plain'")
