"""Splitting a rationale into steps, so that `"".join(steps[:t])` is the reply so far.

`lines` (GSM8K, the built-in arithmetic): every non-empty line is a step, ending with
its newline. `sentences` (MATH): lines cut further after sentences, short pieces merged
into their neighbours, at most `max_steps` steps, and the final-answer sentence ("The
answer is ..." or "Final Answer: ...") a step of its own.
"""

from __future__ import annotations

import re

ANSWER_MARKERS = ("The answer is", "Final Answer:")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=\$\.)\s+|(?<=\.\$)\s+")


def split_lines(text: str) -> list[str]:
  """Non-empty lines, each stripped and ended with a newline."""
  return [line.strip() + "\n" for line in text.strip().split("\n") if line.strip()]


def _pieces(text: str) -> list[str]:
  """Lines and sentences, each keeping the whitespace that follows it."""
  out = []
  for line in re.split(r"(?<=\n)", text):
    start = 0
    for m in _SENTENCE_END.finditer(line):
      out.append(line[start:m.end()])
      start = m.end()
    if start < len(line):
      out.append(line[start:])
  return [p for p in out if p]


def _merge_short(parts: list[str], min_chars: int) -> list[str]:
  merged: list[str] = []
  for part in parts:
    if merged and (not part.strip() or len(part.strip()) < min_chars):
      merged[-1] += part
    else:
      merged.append(part)
  # A short first piece joins the next one.
  if len(merged) > 1 and len(merged[0].strip()) < min_chars:
    merged[1] = merged[0] + merged[1]
    merged.pop(0)
  return merged


def _merge_to(parts: list[str], max_steps: int) -> list[str]:
  """Merges the shortest step into its shorter neighbour until at most max_steps."""
  parts = list(parts)
  while len(parts) > max_steps:
    i = min(range(len(parts)), key=lambda j: len(parts[j]))
    if i == 0:
      j = 1
    elif i == len(parts) - 1:
      j = i - 1
    else:
      j = i - 1 if len(parts[i - 1]) <= len(parts[i + 1]) else i + 1
    lo, hi = min(i, j), max(i, j)
    parts[lo:hi + 1] = [parts[lo] + parts[hi]]
  return parts


def _split_answer(parts: list[str]) -> list[str]:
  """Makes the final-answer sentence a step of its own."""
  last = parts[-1]
  for marker in ANSWER_MARKERS:
    pos = last.find(marker)
    if pos > 0 and last[:pos].strip():
      return parts[:-1] + [last[:pos], last[pos:]]
  return parts


def split_sentences(text: str, max_steps: int = 9, min_chars: int = 20) -> list[str]:
  """MATH-style steps: at most `max_steps`, plus the final-answer step."""
  text = text.strip()
  if not text:
    return []
  parts = _merge_to(_merge_short(_pieces(text), min_chars), max_steps)
  return _split_answer(parts)


def split_steps(text: str, style: str, max_steps: int = 9) -> list[str]:
  if style == "lines":
    return split_lines(text)
  if style == "sentences":
    return split_sentences(text, max_steps)
  raise ValueError(f"step style {style!r}: expected 'lines' or 'sentences'")
