"""Multi-turn RL with feedback (arXiv 2510.21339): the feedback rollout, reward
assignment variants, GRPO with several updates per batch, pass@k and the T-turn
evaluation with feedback."""

import collections
import json
import logging
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxscore import evaluate, objectives
from jaxscore.loops import train as train_lib
from jaxscore.models import logprobs
from jaxscore.models import model as model_lib
from jaxscore.objectives import policy_gradient as pg
from jaxscore.objectives import rl
from jaxscore.sampling import formats
from jaxscore.sampling import rollout as rollout_lib
from jaxscore.sampling import sampler as sampler_lib
from jaxscore.tasks import base

# ---------------------------------------------------------------------------
# Reward assignment on hand-made outcomes: correct at turn 1 (stops), correct at turn 3,
# never correct, correct at turn 2 (stops). Untaken turns are masked.

REWARDS = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0]], np.float32)
TURNS = np.array([[1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 0]], bool)


@pytest.mark.parametrize("name, expected", [
    ("per_turn", [[1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0]]),
    ("outcome", [[1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 0]]),
    # gamma = 0.5: success at turn t earns 0.5^(t-1) on every turn taken.
    ("decayed", [[1, 0, 0], [.25, .25, .25], [0, 0, 0], [.5, .5, 0]]),
])
def test_reward_assignment_golden_returns(name, expected):
  fn, _ = rl.REWARD_ASSIGNMENTS[name]
  np.testing.assert_allclose(fn(jnp.asarray(REWARDS), jnp.asarray(TURNS), 0.5), expected)


def test_group_advantages_with_rows_of_different_lengths():
  turns = jnp.asarray(TURNS)
  # per_turn, pooled over the group's taken turns. Group 0 = rows 0, 1: values 1 | 0 0 1
  # -> mean 1/2, std 1/2. Group 1 = rows 2, 3: 0 0 0 | 0 1 -> mean 1/5, std 2/5.
  adv = rl.masked_group_advantages(jnp.asarray(REWARDS), turns, 2, per_episode=False, eps=0)
  np.testing.assert_allclose(adv, [[1, 0, 0], [-1, -1, 1], [-.5, -.5, -.5], [-.5, 2, 0]],
                             rtol=1e-6)
  # One return per episode (outcome): group 0 -> 1, 1; group 1 -> 0, 1 (std 0.5).
  outcome = rl.outcome_returns(jnp.asarray(REWARDS), turns)
  adv = rl.masked_group_advantages(outcome, turns, 2, per_episode=True)
  np.testing.assert_allclose(adv[:2], 0.0, atol=1e-6)  # Same return: nothing to learn.
  np.testing.assert_allclose(adv[2:], [[-1, -1, -1], [1, 1, 0]], rtol=1e-5)
  # A group where every episode took every turn matches plain GRPO, per turn.
  full = jnp.array([[1., 0.], [0., 1.], [1., 1.], [0., 0.]])
  np.testing.assert_allclose(
      rl.masked_group_advantages(full[:, :1], jnp.ones((4, 1), bool), 4, False),
      rl.group_advantages(full[:, :1], 4), rtol=1e-6)


# ---------------------------------------------------------------------------
# The clipped objective and GRPO's updates.


def test_clipped_ratio_loss_and_where_clipping_binds():
  old = jnp.log(jnp.array([[0.2, 0.2, 0.2, 0.2]]))
  ratio = jnp.array([[1.5, 0.5, 1.1, 0.5]])
  adv = jnp.array([[1.0, -1.0, 1.0, 1.0]])
  logp = old + jnp.log(ratio)
  loss = rl.clipped_ratio_loss(logp, adv, old, 0.2)
  # -min(r A, clip(r) A): 1.5 -> -1.2 (clipped), 0.5 with A<0 -> 0.8 (clipped), 1.1 ->
  # -1.1, 0.5 with A>0 -> -0.5 (the unclipped term is smaller).
  np.testing.assert_allclose(loss, [[-1.2, 0.8, -1.1, -0.5]], rtol=1e-6)
  grad = jax.grad(lambda lp: rl.clipped_ratio_loss(lp, adv, old, 0.2).sum())(logp)
  # d/dlogp (-r A) = -r A where the ratio term is active, 0 where the clip binds.
  np.testing.assert_allclose(grad, [[0.0, 0.0, -1.1, -0.5]], rtol=1e-6)
  np.testing.assert_array_equal(rl.clip_binds(logp, adv, old, 0.2),
                                [[True, True, False, False]])
  batch = pg.RLBatch(tokens_BxT=jnp.zeros((1, 4), jnp.int32), mask_BxT=jnp.ones((1, 4), bool),
                     turn_BxT=jnp.ones((1, 4), jnp.int32), advantages_BxT=adv,
                     kl_coef_BxT=jnp.zeros((1, 4)), ref_logp_BxT=old, old_logp_BxT=old)
  total, m = pg.token_objective(logp, batch, pg.PolicyLossConfig(policy_loss="clipped"))
  assert float(total) == pytest.approx((-1.2 + 0.8 - 1.1 - 0.5) / 4, rel=1e-6)
  assert float(m["policy/clip_frac"]) == pytest.approx(0.5)
  assert float(m["policy/ratio_max_dev"]) == pytest.approx(0.5, rel=1e-5)


CFG = model_lib.ModelConfig(vocab_size=13, num_layers=1, embed_dim=16, num_heads=2,
                            num_kv_heads=1, mlp_dim=24)


def _grpo_batch(params, rows=8, seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (rows, 6), 0, CFG.vocab_size)
  turn = jnp.tile(jnp.array([0, 0, 1, 1, 1, 0]), (rows, 1))
  mask = jnp.ones((rows, 6), bool)
  adv_BxN = jnp.asarray(np.random.default_rng(seed).choice([-1.0, 1.0], (rows, 1)))
  old = logprobs.token_logprobs(params, tokens, mask, CFG)[0]  # Recomputed, as the loop does.
  return pg.RLBatch(tokens_BxT=tokens, mask_BxT=mask, turn_BxT=turn,
                    advantages_BxT=rl.turn_values(turn, adv_BxN),
                    kl_coef_BxT=jnp.zeros((rows, 6)), ref_logp_BxT=old, old_logp_BxT=old)


def test_several_updates_per_batch_match_a_loop_of_single_updates():
  params = model_lib.init(CFG, jax.random.key(0), stddev=0.3)
  batch = _grpo_batch(params)
  loss_fn = lambda *a: pg.policy_gradient_loss(
      *a, cfg=CFG, loss_cfg=pg.PolicyLossConfig(policy_loss="clipped", kl_estimator="k3"))
  opt = optax.sgd(0.5)
  state = train_lib.TrainState.create(params, opt)
  rng = jax.random.key(3)
  many = jax.jit(train_lib.make_train_step(loss_fn, opt, epochs=2, minibatches=2))
  new, metrics = many(state, batch, rng, None)
  # The same updates, one call each, on the rows each epoch's seeded order gives.
  one = jax.jit(train_lib.make_train_step(loss_fn, opt))
  order_rng, step_rng = jax.random.split(jax.random.fold_in(rng, 0))
  p, opt_state, losses = params, state.opt_state, []
  for e in range(2):
    order = np.asarray(jax.random.permutation(jax.random.fold_in(order_rng, e), 8))
    for half in (order[:4], order[4:]):
      mb = jax.tree.map(lambda x: x[half], batch)
      s, m = one(train_lib.TrainState(jnp.int32(0), p, opt_state), mb, step_rng, None)
      p, opt_state = s.params, s.opt_state
      losses.append(float(m["loss"]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               new.params, p)
  assert int(new.step) == 1  # Steps count batches; the optimizer counted 4 updates.
  assert float(metrics["loss"]) == pytest.approx(np.mean(losses), rel=1e-4, abs=1e-6)
  # The first update sees the sampling policy itself: ratio 1. Later ones moved away and
  # the clip binds on some tokens.
  assert float(metrics["first/policy/ratio_max_dev"]) < 1e-5
  assert float(metrics["first/policy/clip_frac"]) == 0.0
  assert float(metrics["policy/clip_frac"]) > 0.0
  assert float(metrics["policy/ratio_max_dev"]) > 0.2
  with pytest.raises(ValueError, match="does not split into 3 minibatches"):
    jax.jit(train_lib.make_train_step(loss_fn, opt, minibatches=3))(state, batch, rng, None)


def test_grpo_objective_batch_and_config_errors():
  ctx = objectives.Context(CFG, num_turns=3, group_size=2)
  obj = objectives.make("grpo", {"reward": "outcome", "epochs": 3, "minibatches": 2}, ctx)
  assert obj.updates_per_batch == (3, 2) and obj.recompute_behaviour_logp
  returns, adv = obj.advantages(REWARDS, TURNS)
  np.testing.assert_allclose(returns, [[1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 0]])
  np.testing.assert_allclose(adv[2:], [[-1, -1, -1], [1, 1, 0]], rtol=1e-5)
  with pytest.raises(ValueError, match="grpo.reward='last': expected one of"):
    objectives.make("grpo", {"reward": "last"}, ctx)
  with pytest.raises(ValueError, match="grpo.gamma=0.0"):
    objectives.make("grpo", {"reward": "decayed", "gamma": 0.0}, ctx)
  with pytest.raises(ValueError, match="zero expected gradient"):
    objectives.make("grpo", {"kl_estimator": "k1"}, ctx)


# ---------------------------------------------------------------------------
# The feedback rollout on a tiny random model with a scripted checker.


class CharTokenizer:
  """Characters as ids 3..; 1 is EOS, 0 padding."""

  eos_token_id, pad_token_id, all_special_ids = 1, 0, [0, 1]

  def encode(self, text, add_special_tokens=False):
    del add_special_tokens
    return [3 + ord(ch) % 29 for ch in text]

  def decode(self, ids, skip_special_tokens=True):
    return "".join(chr(ord("a") + (i - 3) % 26) for i in ids
                   if not (skip_special_tokens and i in self.all_special_ids))


class ScriptedTask:
  """Problem i is answered correctly at its `correct_at` attempt (0: never); counts how
  often each problem is scored, which is the attempt being scored."""

  name, instruction = "scripted", "Check your answer."

  def __init__(self):
    self.calls = collections.Counter()

  def problems(self, split):
    return [base.Problem(id=str(i), question=f"q{i}", prompt=f"question {i}", answer="x",
                         metadata={"correct_at": c}) for i, c in enumerate([1, 3, 0, 2])]

  def score(self, problems, responses):
    out = []
    for p in problems:
      self.calls[p.id] += 1
      ok = self.calls[p.id] == p.metadata["correct_at"]
      out.append(base.Score(float(ok), None, base.CORRECT if ok else base.WRONG))
    return out


def _scripted_setup():
  tok = CharTokenizer()
  cfg = model_lib.ModelConfig(vocab_size=32, num_layers=1, embed_dim=16, num_heads=2,
                              num_kv_heads=1, mlp_dim=24)
  setup = rollout_lib.Setup(cfg, tok, formats.PlainFormat(tok), ScriptedTask())
  return setup, model_lib.init(cfg, jax.random.key(0), stddev=0.5)


def _sampler(setup, problems, feedback):
  """A sampler for 3 turns of up to 4 tokens with `feedback` between them."""
  return rollout_lib.make_sampler(setup, rollout_lib.prompt_lens(setup, problems), 3, 4,
                                  message_len=rollout_lib.instruction_len(setup, feedback))


def _count(seq, sub) -> int:
  return sum(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_feedback_rollout_stops_rows_at_their_first_correct_answer():
  setup, params = _scripted_setup()
  problems = setup.task.problems("train")
  feedback = rollout_lib.Feedback("unary")
  sampler_lib.forget_shared()  # Another test may have compiled this very sampler.
  smp = _sampler(setup, problems, feedback)
  greedy = sampler_lib.SamplingConfig(temperature=0.0, max_new_tokens=4)
  compiles = collections.Counter()

  class CountCompiles(logging.Handler):
    def emit(self, record):
      if m := re.match(r"Compiling jit\((\w+)\)", record.getMessage()):
        compiles[m.group(1)] += 1

  handler = CountCompiles()
  logging.getLogger("jax").addHandler(handler)
  jax.config.update("jax_log_compiles", True)
  try:
    ro = rollout_lib.rollout(params, smp, setup, problems, 3, greedy, jax.random.key(0),
                             feedback=feedback)
    first = dict(compiles)
    setup.task.calls.clear()
    again = rollout_lib.rollout(params, smp, setup, problems, 3, greedy, jax.random.key(1),
                                feedback=feedback)
  finally:
    jax.config.update("jax_log_compiles", False)
    logging.getLogger("jax").removeHandler(handler)
  # Three turns, one append, and one decode per cache-length window the episodes reach
  # (64 and 128 here); nothing new the second time.
  assert first["_decode_impl"] == 2 and first["_append_impl"] == 1, first
  assert dict(compiles) == first, (first, dict(compiles))
  np.testing.assert_array_equal(ro.turns_BxN, TURNS)
  np.testing.assert_array_equal(ro.rewards_BxN, REWARDS)
  np.testing.assert_array_equal(again.rewards_BxN, REWARDS)
  # Each problem was scored once per attempt it made, never after its correct answer.
  assert setup.task.calls == {"0": 1, "1": 3, "2": 3, "3": 2}
  tokens = np.asarray(ro.episode.tokens_BxT)
  turn = np.asarray(ro.episode.turn_BxT)
  length = np.asarray(ro.episode.length_B)
  message = setup.fmt.instruction_ids(rollout_lib.UNARY_FEEDBACK)
  for row, taken in enumerate(TURNS.sum(1)):
    ids = tokens[row, :length[row]].tolist()
    assert _count(ids, message) == taken - 1, row  # Feedback only after wrong answers.
    assert set(np.unique(turn[row][turn[row] > 0])) == set(range(1, taken + 1)), row
    assert ro.ids[taken - 1][row] and all(ro.ids[t][row] == [] for t in range(taken, 3))
    assert all(ro.texts[t][row] == "" for t in range(taken, 3))
  # Row 0 stopped after attempt 1: nothing follows it in the buffer.
  assert length[0] == len(setup.fmt.prompt_ids(problems[0].prompt)) + len(ro.ids[0][0])


def test_feedback_rollout_in_parts_scores_one_part_while_the_other_samples(monkeypatch):
  setup, params = _scripted_setup()
  problems = setup.task.problems("train")
  feedback = rollout_lib.Feedback("unary")
  smp = _sampler(setup, problems, feedback)
  greedy = sampler_lib.SamplingConfig(temperature=0.0, max_new_tokens=4)
  whole = rollout_lib.rollout(params, smp, setup, problems, 3, greedy, jax.random.key(0),
                              feedback=feedback)
  events = []
  for name in ("dispatch", "collect"):
    method = getattr(rollout_lib._FeedbackRows, name)

    def record(self, turn, name=name, method=method):
      events.append((name, "AB"[int(self.problems[0].id) // 2], turn))
      return method(self, turn)

    monkeypatch.setattr(rollout_lib._FeedbackRows, name, record)
  setup.task.calls.clear()
  parts = rollout_lib.rollout(params, smp, setup, problems, 3, greedy, jax.random.key(0),
                              feedback=feedback, score_overlap_splits=2)
  # Part A is problems 0, 1 and part B problems 2, 3. A part's next turn is queued as
  # soon as it is scored, behind the other part's turn: while one part is scored, the
  # device samples the other.
  assert events == [("dispatch", "A", 1), ("dispatch", "B", 1),
                    ("collect", "A", 1), ("dispatch", "A", 2),
                    ("collect", "B", 1), ("dispatch", "B", 2),
                    ("collect", "A", 2), ("dispatch", "A", 3),
                    ("collect", "B", 2), ("dispatch", "B", 3),
                    ("collect", "A", 3), ("collect", "B", 3)]
  # Greedy results do not depend on the split, and rows keep their order.
  np.testing.assert_array_equal(parts.rewards_BxN, whole.rewards_BxN)
  np.testing.assert_array_equal(parts.turns_BxN, whole.turns_BxN)
  assert parts.texts == whole.texts and parts.ids == whole.ids
  assert [[s and s.reward for s in t] for t in parts.scores] == \
      [[s and s.reward for s in t] for t in whole.scores]
  for field in ("tokens_BxT", "turn_BxT", "length_B"):
    np.testing.assert_array_equal(getattr(parts.episode, field),
                                  getattr(whole.episode, field))
  with pytest.raises(ValueError, match="do not split into 3 equal parts"):
    rollout_lib.rollout(params, smp, setup, problems, 3, greedy, jax.random.key(0),
                        feedback=feedback, score_overlap_splits=3)


@pytest.mark.parametrize("kind", ["instruction", "unary"])
def test_rollout_in_consecutive_batches_equals_the_whole_batch(kind, monkeypatch):
  """sample_batches=2: two sampler batches of two rows, one after the other, with the
  whole batch's greedy results in the same row order."""
  setup, params = _scripted_setup()
  problems = setup.task.problems("train")
  feedback = rollout_lib.Feedback(kind)
  smp = _sampler(setup, problems, feedback)
  greedy = sampler_lib.SamplingConfig(temperature=0.0, max_new_tokens=4)
  whole = rollout_lib.rollout(params, smp, setup, problems, 3, greedy, jax.random.key(0),
                              feedback=feedback)
  starts = []
  start_groups = rollout_lib.start_groups
  monkeypatch.setattr(rollout_lib, "start_groups", lambda smp, prompts, *a: (
      starts.append(len(prompts)), start_groups(smp, prompts, *a))[1])
  setup.task.calls.clear()  # The scripted task counts attempts.
  batches = rollout_lib.rollout(params, smp, setup, problems, 3, greedy, jax.random.key(0),
                                feedback=feedback, sample_batches=2)
  assert starts == [2, 2]
  np.testing.assert_array_equal(batches.rewards_BxN, whole.rewards_BxN)
  np.testing.assert_array_equal(batches.turns_BxN, whole.turns_BxN)
  assert batches.texts == whole.texts and batches.ids == whole.ids
  assert [[s and s.reward for s in t] for t in batches.scores] == \
      [[s and s.reward for s in t] for t in whole.scores]
  for field in ("tokens_BxT", "turn_BxT", "length_B"):
    np.testing.assert_array_equal(getattr(batches.episode, field),
                                  getattr(whole.episode, field))
  with pytest.raises(ValueError, match="rollout.sample_batches=3"):
    rollout_lib.rollout(params, smp, setup, problems, 3, greedy, jax.random.key(0),
                        feedback=feedback, sample_batches=3)


@pytest.mark.parametrize("kind", ["instruction", "unary"])
def test_rollout_of_groups_prefills_each_prompt_once_with_the_same_samples(kind):
  setup, params = _scripted_setup()
  problems = [p for p in setup.task.problems("train") for _ in range(2)]  # Groups of 2.
  feedback = rollout_lib.Feedback(kind)
  smp = _sampler(setup, problems, feedback)
  sampling = sampler_lib.SamplingConfig(temperature=1.0, max_new_tokens=4)
  run = lambda group_size: rollout_lib.rollout(
      params, smp, setup, problems, 3, sampling, jax.random.key(7), feedback=feedback,
      group_size=group_size)
  setup.task.calls.clear()
  each = run(1)
  setup.task.calls.clear()
  started = []
  start = smp.start
  smp.start = lambda prompts, rng: started.append(len(prompts)) or start(prompts, rng)
  grouped = run(2)
  assert started == [4]  # One row per prompt, copied to its group after prefill.
  assert grouped.texts == each.texts and grouped.ids == each.ids
  np.testing.assert_array_equal(grouped.rewards_BxN, each.rewards_BxN)
  np.testing.assert_array_equal(grouped.episode.tokens_BxT, each.episode.tokens_BxT)
  np.testing.assert_allclose(grouped.episode.logp_BxT, each.episode.logp_BxT, atol=1e-5)
  # Samples differ within a group: the copies decode independently.
  assert any(each.ids[0][i] != each.ids[0][i + 1] for i in range(0, 8, 2))
  with pytest.raises(ValueError, match="do not share one prompt"):
    rollout_lib.rollout(params, smp, setup, problems[1:] + problems[:1], 3, sampling,
                        jax.random.key(7), feedback=feedback, group_size=2)


def test_instruction_feedback_keeps_every_turn_and_templates_are_checked():
  setup, params = _scripted_setup()
  problems = setup.task.problems("train")
  smp = rollout_lib.make_sampler(setup, rollout_lib.prompt_lens(setup, problems), 2, 3)
  ro = rollout_lib.rollout(params, smp, setup, problems, 2,
                           sampler_lib.SamplingConfig(temperature=0.0, max_new_tokens=3),
                           jax.random.key(0))
  assert ro.turns_BxN.all()
  fb = rollout_lib.Feedback("template", "Wrong: {reason}.")
  assert fb.message(None, base.Score(0.0, None, base.NO_ANSWER)) == \
      "Wrong: no final answer was found."
  assert rollout_lib.instruction_len(setup, fb) == max(
      len(setup.fmt.instruction_ids(m)) for m in fb.messages(None))
  with pytest.raises(ValueError, match="only {reason} may be substituted"):
    rollout_lib.Feedback("template", "The answer was {answer}")
  with pytest.raises(ValueError, match="feedback='loud': expected one of"):
    rollout_lib.Feedback("loud")


# ---------------------------------------------------------------------------
# Evaluation protocols.


def test_pass_at_k_matches_the_closed_form():
  for n in range(1, 9):
    for c in range(n + 1):
      for k in range(1, n + 1):
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert evaluate.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)
  assert evaluate.pass_at_k(8, 1, 1) == pytest.approx(1 / 8)
  with pytest.raises(ValueError):
    evaluate.pass_at_k(4, 5, 1)


def test_t_turn_evaluation_with_feedback_on_a_scripted_model():
  setup, params = _scripted_setup()
  problems = setup.task.problems("test")
  result, records = evaluate.evaluate(params, setup, problems, num_turns=3, max_new_tokens=3,
                                      batch_size=4, feedback=rollout_lib.Feedback("unary"))
  # Correct by turn t: problem 0 at 1, problem 3 at 2, problem 1 at 3, problem 2 never.
  assert [result[f"acc@t{t}"] for t in (1, 2, 3)] == [0.25, 0.5, 0.75]
  assert result["delta_i->c"] == 0.5 and result["delta_c->i"] == 0.0
  assert [len(r["attempts"]) for r in records] == [1, 3, 3, 2]
  assert records[3]["rewards"] == [0.0, 1.0] and records[3]["reasons"] == ["wrong", "correct"]
  json.dumps(records)


def test_pass_at_k_evaluation_counts_correct_samples():
  setup, params = _scripted_setup()
  # Every sample of problem i is scored once: correct only for the correct_at-th sample
  # (ScriptedTask counts calls), so each problem with correct_at in 1..4 has 1 of 4.
  result, records = evaluate.evaluate_pass_at_k(
      params, setup, setup.task.problems("test"), num_samples=4, temperature=1.0,
      max_new_tokens=3, batch_size=8)
  assert [r["num_correct"] for r in records] == [1, 1, 0, 1]
  assert result["pass@1"] == pytest.approx(0.75 * 0.25)
  assert result["pass@4"] == pytest.approx(0.75)
  assert set(result) >= {"pass@1", "pass@2", "pass@4"} and "pass@8" not in result


@pytest.mark.slow
def test_multi_turn_grpo_with_feedback_trains_through_the_online_loop(tmp_path):
  from test_checkpoint import _config, _tiny_setup

  from jaxscore.loops import online

  setup, params = _tiny_setup()
  c = _config()
  c.objective = "grpo"
  c.grpo.num_steps, c.grpo.epochs, c.grpo.minibatches = 2, 2, 2
  c.rollout.num_turns, c.rollout.feedback = 3, "unary"
  state, info = online.train(c, setup, params, params, tmp_path)
  assert int(state.step) == 2 and info["step"] == 2
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  for r in records:
    assert 1.0 <= r["turns/mean"] <= 3.0
    assert r["first/policy/ratio_max_dev"] < 1e-4  # Recomputed behaviour log-probs.
    assert 0.0 <= r["policy/clip_frac"] <= 1.0
    assert r["reward/t1"] <= r["reward/t2"] <= r["reward/t3"]  # Correct by turn t.


def test_instruction_feedback_sends_its_template_not_the_task_instruction():
  setup, params = _scripted_setup()
  problems = setup.task.problems("train")
  critique = rollout_lib.Feedback("instruction", "Review and revise your answer now.")
  smp = rollout_lib.make_sampler(setup, rollout_lib.prompt_lens(setup, problems), 2, 3,
                                 message_len=rollout_lib.instruction_len(setup, critique))
  greedy = sampler_lib.SamplingConfig(temperature=0.0, max_new_tokens=3)
  ro = rollout_lib.rollout(params, smp, setup, problems, 2, greedy, jax.random.key(0),
                           feedback=critique)
  template = setup.fmt.instruction_ids(critique.template)
  task_instruction = setup.fmt.instruction_ids(setup.task.instruction)
  tokens, length = np.asarray(ro.episode.tokens_BxT), np.asarray(ro.episode.length_B)
  for row in range(len(problems)):
    ids = tokens[row, :length[row]].tolist()
    assert _count(ids, template) == 1, row
    assert _count(ids, task_instruction) == 0, row
