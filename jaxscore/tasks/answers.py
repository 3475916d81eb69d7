"""Extracting final answers from responses, and judging them against gold answers."""

from __future__ import annotations

import re
import threading
from decimal import Decimal, InvalidOperation

# SCoRe's MATH format: `Final Answer: The final answer is $X$. I hope it is correct.`
_FINAL_ANSWER = re.compile(r"Final Answer:\s*The final answer is\s*\$?(.+?)\$?\s*\.?\s*"
                           r"I hope it is correct",
                           re.IGNORECASE | re.DOTALL)
_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS = re.compile(r"answer is[:\s]*\$?([^\n$]+?)\$?(?:\.\s|\.?$|\n)",
                        re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_boxed(text: str) -> str | None:
  """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced."""
  start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
  if start < 0:
    return None
  i = text.find("{", start)
  if i < 0:
    # `\boxed 5` form.
    m = re.match(r"\\boxed\s+([^\s$]+)", text[start:])
    return m.group(1) if m else None
  depth = 0
  for j in range(i, len(text)):
    if text[j] == "{":
      depth += 1
    elif text[j] == "}":
      depth -= 1
      if depth == 0:
        return text[i + 1:j]
  return None


def extract_answer(text: str, fallback_last_number: bool = False) -> str | None:
  """The final answer in the formats prompts ask for, or None.

  Tried in order: SCoRe's `Final Answer: The final answer is $X$. I hope it is
  correct.`, the last `\\boxed{X}`, GSM8K's `#### X`, `The answer is X`; with
  `fallback_last_number`, the last number in the text.
  """
  m = list(_FINAL_ANSWER.finditer(text))
  if m:
    answer = m[-1].group(1).strip()
    boxed = last_boxed(answer)
    return (boxed if boxed is not None else answer).strip()
  boxed = last_boxed(text)
  if boxed is not None:
    return boxed.strip()
  m = list(_HASHES.finditer(text))
  if m:
    return m[-1].group(1).strip()
  m = list(_ANSWER_IS.finditer(text))
  if m:
    return m[-1].group(1).strip()
  if fallback_last_number:
    numbers = _NUMBER.findall(text)
    if numbers:
      return numbers[-1]
  return None


def parse_number(text: str) -> Decimal | None:
  """A number written with commas, a currency sign, units, or trailing zeros."""
  text = text.strip().replace(",", "").replace("\\$", "").replace("$", "")
  text = re.sub(r"\\(?:text|mbox|mathrm)\{[^}]*\}", "", text)  # LaTeX units.
  text = text.replace("\\%", "").replace("%", "").replace("\\!", "").strip()
  m = re.match(r"^[^\d\-.]*(-?\d*\.?\d+(?:[eE][-+]?\d+)?)", text)
  if not m:
    return None
  try:
    return Decimal(m.group(1))
  except InvalidOperation:
    return None


def numbers_equal(gold: str, predicted: str | None) -> bool:
  """GSM8K-style numeric equality (`1,000` == `1000.0` == `$1000 dollars`)."""
  if predicted is None:
    return False
  a, b = parse_number(gold), parse_number(predicted)
  if a is None or b is None:
    return False
  # Decimal is exact, so only written-out rounding needs slack; a relative
  # tolerance would equate 1450000 and 1450001.
  return abs(a - b) <= Decimal("1e-6")


def math_equal(gold: str, predicted: str | None, timeout_s: int = 5) -> bool:
  """Mathematical equivalence of two LaTeX answers with math-verify.

  math-verify times out with `signal.alarm`, which works on a process's main thread
  only; elsewhere it runs without its own timeout and the caller bounds the time
  (e.g. a worker process with a deadline).
  """
  import math_verify

  if predicted is None:
    return False
  on_main = threading.current_thread() is threading.main_thread()
  parse_timeout = timeout_s if on_main else None
  gold_parsed = math_verify.parse(_as_latex(gold), parsing_timeout=parse_timeout)
  pred_parsed = math_verify.parse(_as_latex(predicted), parsing_timeout=parse_timeout)
  if not gold_parsed or not pred_parsed:
    return _normalize(gold) == _normalize(predicted)
  return bool(math_verify.verify(gold_parsed, pred_parsed,
                                 timeout_seconds=timeout_s if on_main else None))


def _as_latex(answer: str) -> str:
  answer = answer.strip()
  return answer if answer.startswith("$") else f"${answer}$"


def _normalize(s: str) -> str:
  return re.sub(r"\s+", "", s).rstrip(".")
