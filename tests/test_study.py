"""The study harness: arms as config overrides, and every arm end to end at smoke sizes."""

import dataclasses
import json
import pathlib
import sys

import pytest

from jaxscore import config_checks, experiment, objectives, study
from jaxscore.loops import online

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from conftest import require_embedded  # noqa: E402

from configs import study as study_config  # noqa: E402


@pytest.mark.parametrize("variant", ["cpu", "gsm8k", "cpu,runlocal", "score_effect",
                                     "score_effect,runlocal"])
def test_every_arm_is_a_valid_override_of_the_config(variant):
  c = study_config.get_config(variant)
  rl_batch = c.rollout.prompts_per_step * c.rollout.group_size
  for name in c.study.arms.split(","):
    ac = study.arm_config(c, name)
    if experiment.kind(ac) == "online":
      obj = objectives.get(ac.objective)
      config = obj.Config(**ac[ac.objective])
      steps = config.num_steps if hasattr(config, "num_steps") else sum(
          int(s.split(":")[1]) for s in config.stages.split(","))
      # Equal budgets: every RL arm samples the same number of episodes.
      assert steps * rl_batch == max(c.study.episodes // rl_batch, 1) * rl_batch, name
      assert online.RolloutConfig(**ac.rollout).feedback_config  # Valid feedback.
    elif experiment.kind(ac) == "self_training":
      # Equal budgets: problems x samples per problem x rounds.
      obj = objectives.get(ac.objective)
      config = obj.Config(**ac[ac.objective])
      rounds = obj(config, objectives.Context(None)).rounds
      assert config.problems_per_round * config.group_size * rounds == c.study.episodes, name
  single = study.arm_config(c, "single_turn_grpo")
  multi = study.arm_config(c, "multi_turn_decayed")
  assert single.rollout.num_turns == 1 and multi.rollout.num_turns == c.study.train_turns
  assert multi.rollout.feedback == "unary" and multi.grpo.reward == "decayed"
  assert {f.name for f in dataclasses.fields(objectives.get("grpo").Config)} == set(c.grpo)


def test_bad_arms_are_clear_errors():
  c = study_config.get_config("cpu")
  c.unlock()
  c.arms.typo = "objective=grpo;grpo.rewrd=outcome"
  c.arms.magic = "objective=magic"
  c.arms.kind = "objective=grpo;grpo.num_steps=many"
  c.arms.shape = "objective=grpo;objective"
  with pytest.raises(ValueError, match="arms.typo: grpo.rewrd is not a config field"):
    study.arm_config(c, "typo")
  c.study.arms = "base,magic"
  with pytest.raises(config_checks.ConfigError,
                     match="arms.magic: objective='magic': expected one of .*or none"):
    study.check(c)
  with pytest.raises(ValueError, match="grpo.num_steps='many': expected a value of type int"):
    study.arm_config(c, "kind")
  with pytest.raises(ValueError, match="'objective' is not key=value"):
    study.arm_config(c, "shape")
  with pytest.raises(ValueError, match="no arm 'nope'"):
    study.arm_config(c, "nope")


@pytest.mark.slow
def test_every_kind_of_arm_runs_end_to_end_and_a_rerun_skips_its_arms(tmp_path, capsys,
                                                                       monkeypatch):
  """Arms without training and self-training arms, and every evaluation protocol, on the
  embedded model. RL arms run
  end to end in the score_effect experiment's test below (score and pg), and multi-turn
  GRPO with feedback through the same loop in test_feedback_rl.py; the other RL arms
  differ from those only in config overrides, which the tests above check (each RL arm
  costs half a minute here, mostly saving 1.6 GB of parameters and Adam state)."""
  require_embedded()
  c = study_config.get_config("cpu,runlocal")
  c.unlock()
  c.study.arms = "base,self_refine,star,pair_sft"
  c.lock()
  assert {experiment.kind(study.arm_config(c, n)) for n in c.study.arms.split(",")} == \
      {"none", "self_training"}
  results = study.Study(c, tmp_path).run()
  names = c.study.arms.split(",")
  assert list(results) == names
  table = (tmp_path / "summary.md").read_text()
  for name in names:
    assert f"| {name} |" in table
    r = json.loads((tmp_path / "arms" / name / "result.json").read_text())
    assert set(r["metrics"]) == {
        "pass@1", "pass@2", "dialogue/acc@t1", "dialogue/acc@t2", "intrinsic/acc@t1",
        "intrinsic/acc@t2", "intrinsic/delta", "intrinsic/delta_i->c", "intrinsic/delta_c->i"}
    for k, (mean, lo, hi) in r["metrics"].items():
      assert (-1 if k == "intrinsic/delta" else 0) <= lo <= mean <= hi <= 1, k
    turns = r["per_problem"]
    # Correct by turn t never decreases in the dialogue with feedback.
    assert all(a <= b for a, b in zip(turns["dialogue/acc@t1"], turns["dialogue/acc@t2"]))
    # delta = delta_i->c - delta_c->i, problem by problem.
    assert [a - b for a, b in zip(turns["intrinsic/delta_i->c"], turns["intrinsic/delta_c->i"])
            ] == turns["intrinsic/delta"]
    trained = r["objective"] != "none"
    assert (r["budget"]["episodes"] == c.study.episodes) == trained, name
    assert (r["budget"]["tokens"] > 0) == trained, name
  refine = json.loads((tmp_path / "arms" / "self_refine" / "result.json").read_text())
  base = json.loads((tmp_path / "arms" / "base" / "result.json").read_text())
  assert refine["feedback"]["intrinsic"] == study_config.SELF_REFINE_PROMPT
  from jaxscore import tasks

  assert base["feedback"] == {"dialogue": "unary",
                              "intrinsic": tasks.make_task("arithmetic").instruction}
  # Self-Refine is a prompt: without it (pass@k, the dialogue) it is the base model.
  for k in ("dialogue/acc@t1", "dialogue/acc@t2"):
    assert refine["per_problem"][k] == base["per_problem"][k]
  assert (tmp_path / "summary.png").stat().st_size > 0
  capsys.readouterr()
  monkeypatch.setattr(study.rollout, "from_config",
                      lambda c: pytest.fail("a rerun of finished arms loaded the model"))
  study.Study(c, tmp_path).run()
  assert capsys.readouterr().out.count("finished earlier") == len(names)
  assert (tmp_path / "summary.md").read_text() == table


def test_score_effect_arms_are_scores_ablations():
  c = study_config.get_config("score_effect")
  arms = {name: study.arm_config(c, name) for name in c.study.arms.split(",")}
  assert set(arms) == {"base", "score", "score_alpha0", "stage2_only", "single_turn_pg",
                       "score_long_stage1"}
  score, alpha0, stage2, single = (arms[n] for n in ("score", "score_alpha0", "stage2_only",
                                                     "single_turn_pg"))
  assert score.score.stages == alpha0.score.stages == "I:12,II:24"
  assert score.score.alpha == 10.0 and alpha0.score.alpha == 0.0
  assert stage2.score.stages == "II:36"
  assert (single.objective, single.rollout.num_turns, single.pg.num_steps) == ("pg", 1, 36)
  assert single.pg.beta == score.score.beta1
  # The one tuning within SCoRe's recipe: only the stage split moves.
  tuned = arms["score_long_stage1"]
  assert tuned.score.stages == "I:24,II:12"
  assert tuned.score.to_dict() | {"stages": ""} == score.score.to_dict() | {"stages": ""}


@pytest.mark.slow
def test_score_effect_experiment_runs_every_arm_and_reports(tmp_path):
  """benchmarks/score_effect.py at smoke sizes: every arm trains and is evaluated, and the
  report has each arm's row, the paired differences, a verdict and the curves. Left
  out, as the test above checks their configs: the tuned arm (score_long_stage1), whose
  split at smoke sizes is score's (I:1, II:1), the same run; score_alpha0, score's run
  with another alpha; and stage2_only, score's run without its Stage I step."""
  import subprocess

  require_embedded()
  out = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "score_effect.py"),
       "--config=configs/study.py:score_effect,runlocal", f"--workdir={tmp_path / 'run'}",
       f"--out={tmp_path / 'out'}", "--sampled_samples=2",
       "--config.study.arms=base,score,single_turn_pg"],
      cwd=ROOT, capture_output=True,
      text=True, timeout=1200)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  text = (tmp_path / "out" / "score_effect.md").read_text()
  for name in ("base", "score", "single_turn_pg"):
    assert f"| {name} |" in text, name
  assert "Each arm minus score" in text and "SCoRe's" in text
  assert "sampled at temperature 1.0 (2 episodes per problem" in text
  data = json.loads((tmp_path / "out" / "score_effect.json").read_text())
  curves = data["curves"]
  assert curves["base"] == [] and len(curves["score"]) == 2  # runlocal: I:1, II:1.
  for record in curves["score"]:
    assert 0 <= record["self_correction/edit_distance_ratio"] <= 1 and "kl/t1" in record
  assert "self_correction/delta" not in curves["single_turn_pg"][0]  # One attempt.
  assert (tmp_path / "out" / "score_effect.png").stat().st_size > 0
  sampled = data["sampled_intrinsic"]["score"]
  assert sampled["samples"] == 2 and sampled["num_problems"] == 4
  for a1, a2, d, i2c, c2i in zip(*(sampled["per_problem"][k] for k in (
      "acc@t1", "acc@t2", "delta", "delta_i->c", "delta_c->i"))):
    # Per problem: Delta is the flips' difference and the accuracies' difference.
    assert d == pytest.approx(i2c - c2i) == pytest.approx(a2 - a1)


# ---------------------------------------------------------------------------
# What STaR and Pair-SFT keep, the problems every arm sees, paired differences.


def _setup_without_a_model():
  from test_feedback_rl import CharTokenizer, ScriptedTask

  from jaxscore.sampling import formats, rollout

  tok = CharTokenizer()
  return rollout.Setup(None, tok, formats.PlainFormat(tok), ScriptedTask())


class _Rollouts:
  def __init__(self, problems, texts, rewards):
    import numpy as np

    self.problems, self.texts, self.rewards_BxN = problems, texts, np.asarray(rewards, float)


def test_star_keeps_traces_whose_second_attempt_is_right_in_context():
  import numpy as np

  setup = _setup_without_a_model()
  star = objectives.make("star", {}, objectives.Context(None))
  fmt, p = setup.fmt, setup.task.problems("train")[:4]
  texts = [["w0", "r1", "w2", "r3"], ["r0", "r1", "w2", "w3"]]  # [turn][row]
  ro = _Rollouts(p, texts, [[0, 1], [1, 1], [0, 0], [1, 0]])  # i->c, c->c, i->i, c->i
  rng = np.random.default_rng(0)
  kept = star.keep(setup, [(ro, 4)], rng)
  instruction = fmt.instruction_ids(setup.task.instruction)
  assert [e["prompt"] for e in kept] == [
      fmt.prompt_ids(p[i].prompt) + fmt.attempt_ids(texts[0][i]) + instruction for i in (0, 1)]
  assert [e["completion"] for e in kept] == [
      fmt.attempt_ids(texts[1][i]) + [setup.tokenizer.eos_token_id] for i in (0, 1)]
  assert star.keep(setup, [(ro, 1)], rng) == kept[:1]  # Padding rows are never kept.
  assert (star.turns, star.rounds, star.resamples) == (2, 2, True)


def test_pair_sft_pairs_each_wrong_attempt_with_a_random_correct_one():
  import numpy as np

  setup = _setup_without_a_model()
  pair = objectives.make("pair_sft", {}, objectives.Context(None))
  fmt, (a, b) = setup.fmt, setup.task.problems("train")[:2]
  # Problem a: two wrong, three right; problem b: only wrong (nothing to pair).
  rows = [a] * 5 + [b] * 2
  texts = [["wa1", "ra1", "wa2", "ra2", "ra3", "wb1", "wb2"]]
  ro = _Rollouts(rows, texts, [[0], [1], [0], [1], [1], [0], [0]])
  kept = pair.keep(setup, [(ro, 7)], np.random.default_rng(0))
  instruction = fmt.instruction_ids(setup.task.instruction)
  assert [e["prompt"] for e in kept] == [
      fmt.prompt_ids(a.prompt) + fmt.attempt_ids(w) + instruction for w in ("wa1", "wa2")]
  right = {tuple(fmt.attempt_ids(r) + [1]) for r in ("ra1", "ra2", "ra3")}
  assert all(tuple(e["completion"]) in right for e in kept)
  # The pairing is random: over seeds every correct response is drawn.
  drawn = {tuple(e["completion"]) for seed in range(20)
           for e in pair.keep(setup, [(ro, 7)], np.random.default_rng(seed))}
  assert drawn == right
  assert (pair.turns, pair.rounds) == (1, 1)
  with pytest.raises(ValueError, match="learns from its own samples"):
    pair.examples(setup, [a])


def test_the_seeded_order_is_the_rl_loops_batches_one_after_another():
  """Self-training rounds draw consecutive problems of this order, as RL steps do."""
  setup = _setup_without_a_model()
  c = study_config.get_config("cpu")
  problems = setup.task.problems("train") * 5
  rl = [p for step in range(3) for p in online.batch_problems(
      problems, step, c.rollout.prompts_per_step, c.seed)]
  n = 3 * c.rollout.prompts_per_step
  assert online.seeded_problems(problems, 0, n, c.seed) == rl
  assert online.seeded_problems(problems, 4, 4, c.seed) == rl[4:8]
  assert [p.id for p in rl] != [p.id for p in problems[:n]]  # Not file order.


def test_paired_differences_to_the_reference_arm():
  import numpy as np

  from jaxscore import evaluate

  a, ref = [1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]
  results = {"ref": {"per_problem": {"m": ref}}, "arm": {"per_problem": {"m": a}}}
  d = study.differences(results, "ref", ["m"])
  assert list(d) == ["arm"]
  assert d["arm"]["m"] == evaluate.paired_bootstrap(np.array(a), np.array(ref))
  assert d["arm"]["m"][0] == 0.5


# ---------------------------------------------------------------------------
# Equal sampled tokens instead of equal episodes.


def _tiny_study(tmp_path, budget_tokens: int, episodes: int = 64):
  """A Study over a tiny random model with the embedded tokenizer, `study.budget=tokens`."""
  from test_checkpoint import _tiny_setup

  setup, params = _tiny_setup()
  c = study_config.get_config("cpu,runlocal")
  c.unlock()
  c.study.budget, c.study.tokens, c.study.episodes = "tokens", budget_tokens, episodes
  c.arms.star = f"objective=star;star.problems_per_round={episodes // 2 // 2}"
  c.arms.pair_sft = f"objective=pair_sft;pair_sft.problems_per_round={episodes // 2}"
  c.sampler.max_new_tokens = 4
  c.evaluate.batch_size = 4
  c.checkpoint.every_steps = 1000
  c.lock()
  st = study.Study.__new__(study.Study)
  st.c, st.workdir, st.setup, st.base_params = c, tmp_path, setup, params
  return st


@pytest.mark.slow
def test_a_token_budget_stops_every_kind_of_arm_just_past_it(tmp_path):
  """RL stops after the step that reaches the budget; STaR and Pair-SFT after the batch
  that reaches each round's share; an arm that runs out of cap first is flagged."""
  st = _tiny_study(tmp_path, budget_tokens=40)
  ac = study.arm_config(st.c, "single_turn_grpo")
  ac.unlock()
  ac.grpo.num_steps = 50  # The cap, far past the budget.
  _, budget = st.train(ac, tmp_path / "rl")
  per_step = [json.loads(l)["budget/tokens"]
              for l in (tmp_path / "rl" / "train" / "metrics.jsonl").read_text().splitlines()]
  assert sum(per_step[:-1]) < 40 <= sum(per_step) == budget["tokens"]
  assert budget["episodes"] == len(per_step) * ac.rollout.prompts_per_step * \
      ac.rollout.group_size and not budget["capped"]

  for name, rounds in (("pair_sft", 1), ("star", 2)):
    ac = study.arm_config(st.c, name)
    group = ac[name].group_size
    _, budget = st.train(ac, tmp_path / name)
    share = 40 / rounds
    per_call = max(ac.evaluate.batch_size // group, 1)
    assert len(budget["rounds"]) == rounds
    for r in budget["rounds"]:
      # Each round samples whole batches until its share is reached, and no more.
      assert r["tokens"] >= share
      assert r["sampled"] % (per_call * group) == 0
      assert r["sampled"] < st.c.study.episodes // rounds
    assert budget["tokens"] == sum(r["tokens"] for r in budget["rounds"]) >= 40
    assert budget["episodes"] == sum(r["sampled"] for r in budget["rounds"])
    assert not budget["capped"]

  capped = _tiny_study(tmp_path / "capped", budget_tokens=10**6, episodes=4)
  ac = study.arm_config(capped.c, "pair_sft")
  _, budget = capped.train(ac, tmp_path / "capped" / "pair_sft")
  assert budget["episodes"] == 4 and budget["capped"]


def test_the_summary_names_the_budget_and_flags_capped_arms():
  c = study_config.get_config("cpu")
  c.unlock()
  c.study.budget, c.study.tokens = "tokens", 3000
  c.study.arms, c.study.reference_arm = "a,b", "a"
  c.lock()
  metrics = {"pass@1": (0.5, 0.4, 0.6), "dialogue/acc@t1": (0.5, 0.4, 0.6),
             "intrinsic/acc@t1": (0.5, 0.4, 0.6), "intrinsic/acc@t2": (0.5, 0.4, 0.6),
             "intrinsic/delta": (0.0, -0.1, 0.1)}
  per_problem = {k: [0.5, 0.5] for k in metrics}
  results = {name: {"objective": "grpo", "num_problems": 2, "metrics": metrics,
                    "per_problem": per_problem,
                    "budget": {"episodes": 96, "tokens": tokens, "capped": capped}}
             for name, tokens, capped in (("a", 3010, False), ("b", 2500, True))}
  table = study.format_summary(results, c)
  assert "| a | grpo | 96 | 3010 |" in table and "| b | grpo | 96 | 2500 (cap) |" in table
  assert "3000 sampled training tokens" in table and "cap of 96 episodes" in table


def test_a_token_budget_needs_its_size():
  from jaxscore import config_checks

  c = study_config.get_config("cpu")
  c.unlock()
  c.study.budget = "tokens"
  with pytest.raises(config_checks.ConfigError, match="study.budget=tokens needs study.tokens"):
    study.check(c)
  c.study.budget = "flops"
  with pytest.raises(config_checks.ConfigError, match="study.budget='flops': expected"):
    study.check(c)
