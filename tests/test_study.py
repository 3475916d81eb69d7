"""The study harness: arms as config overrides, and every arm end to end at smoke sizes."""

import dataclasses
import json
import pathlib
import sys

import pytest

from jaxscore import objectives, study
from jaxscore.loops import online

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import study as study_config  # noqa: E402
from conftest import require_embedded  # noqa: E402


@pytest.mark.parametrize("variant", ["cpu", "gsm8k", "cpu,runlocal"])
def test_every_arm_is_a_valid_override_of_the_config(variant):
  c = study_config.get_config(variant)
  rl_batch = c.rollout.prompts_per_step * c.rollout.group_size
  for name in c.study.arms.split(","):
    method, ac = study.arm_config(c, name)
    if method == "rl":
      obj = objectives.get(ac.objective)
      config = obj.Config(**ac[ac.objective])
      steps = config.num_steps if hasattr(config, "num_steps") else sum(
          int(s.split(":")[1]) for s in config.stages.split(","))
      # Equal budgets: every RL arm samples the same number of episodes.
      assert steps * rl_batch == max(c.study.episodes // rl_batch, 1) * rl_batch, name
      online.RolloutConfig(**ac.rollout).feedback_config  # Valid feedback.
  _, single = study.arm_config(c, "single_turn_grpo")
  _, multi = study.arm_config(c, "multi_turn_decayed")
  assert single.rollout.num_turns == 1 and multi.rollout.num_turns == c.study.train_turns
  assert multi.rollout.feedback == "unary" and multi.grpo.reward == "decayed"
  assert {f.name for f in dataclasses.fields(objectives.get("grpo").Config)} == set(c.grpo)


def test_bad_arms_are_clear_errors():
  c = study_config.get_config("cpu")
  c.unlock()
  c.arms.typo = "method=rl;grpo.rewrd=outcome"
  c.arms.method = "method=magic"
  c.arms.kind = "method=rl;grpo.num_steps=many"
  c.arms.shape = "method=rl;objective"
  with pytest.raises(ValueError, match="arms.typo: grpo.rewrd is not a config field"):
    study.arm_config(c, "typo")
  with pytest.raises(ValueError, match="method='magic', expected one of"):
    study.arm_config(c, "method")
  with pytest.raises(ValueError, match="grpo.num_steps='many': expected a value of type int"):
    study.arm_config(c, "kind")
  with pytest.raises(ValueError, match="'objective' is not key=value"):
    study.arm_config(c, "shape")
  with pytest.raises(ValueError, match="no arm 'nope'"):
    study.arm_config(c, "nope")


@pytest.mark.slow
def test_every_method_runs_end_to_end_and_a_rerun_skips_its_arms(tmp_path, capsys):
  """One arm per method and evaluation protocol on the embedded model: the other RL arms
  differ from multi_turn_decayed only in config overrides, which the test above checks
  (each RL arm costs half a minute here, mostly saving 1.6 GB of parameters and Adam
  state)."""
  require_embedded()
  c = study_config.get_config("cpu,runlocal")
  c.unlock()
  c.study.arms = "base,self_refine,multi_turn_decayed,star,pair_sft"
  c.lock()
  assert {study.arm_config(c, n)[0] for n in c.study.arms.split(",")} == set(study.METHODS)
  results = study.Study(c, tmp_path).run()
  names = c.study.arms.split(",")
  assert list(results) == names
  table = (tmp_path / "summary.md").read_text()
  for name in names:
    assert f"| {name} |" in table
    r = json.loads((tmp_path / "arms" / name / "result.json").read_text())
    assert set(r["metrics"]) == {"pass@1", "pass@2", "acc@t1", "acc@t2"}
    for mean, lo, hi in r["metrics"].values():
      assert 0 <= lo <= mean <= hi <= 1
    turns = r["per_problem"]
    if r["feedback"] == "unary":  # Correct by turn t never decreases.
      assert all(a <= b for a, b in zip(turns["acc@t1"], turns["acc@t2"]))
    trained = r["method"] != "none"
    assert (r["budget"]["episodes"] == c.study.episodes) == trained, name
    assert (r["budget"]["tokens"] > 0) == trained, name
  assert json.loads((tmp_path / "arms" / "self_refine" / "result.json").read_text())[
      "feedback"] == "instruction"
  assert (tmp_path / "summary.png").stat().st_size > 0
  capsys.readouterr()
  study.Study(c, tmp_path).run()
  assert capsys.readouterr().out.count("finished earlier") == len(names)
