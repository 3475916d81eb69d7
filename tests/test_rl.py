"""RL building blocks against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscore import objectives
from jaxscore.models import logprobs
from jaxscore.models import model as model_lib
from jaxscore.objectives import dpo, rl
from jaxscore.sampling import sampler as sampler_lib

CFG = model_lib.ModelConfig(vocab_size=31, num_layers=1, embed_dim=16, num_heads=2,
                            num_kv_heads=1, mlp_dim=24)


def score_objective(stage: str, group_size: int = 2, num_turns: int = 2, sampling=None,
                    **fields):
  """SCoRe fixed at one stage (step 0 of a one-stage schedule)."""
  return objectives.make("score", dict(stages=f"{stage}:1", **fields),
                         objectives.Context(CFG, num_turns, group_size, sampling))


def test_kl_estimators_golden():
  logp = jnp.log(jnp.array([[0.5, 0.2]]))
  ref = jnp.log(jnp.array([[0.25, 0.4]]))
  np.testing.assert_allclose(rl.kl_k1(logp, ref), [[math.log(2), math.log(0.5)]], rtol=1e-6)
  # k3 = exp(r) - r - 1 with r = log(ref / p): r = log 0.5 and log 2.
  expected = [[0.5 - math.log(0.5) - 1, 2 - math.log(2) - 1]]
  np.testing.assert_allclose(rl.kl_k3(logp, ref), expected, rtol=1e-6)


def test_exact_kl_golden():
  # One position predicting the next token over a 2-token vocabulary.
  p, q = np.array([0.7, 0.3]), np.array([0.4, 0.6])
  logits = jnp.log(jnp.array([[p, p]]))
  ref_logits = jnp.log(jnp.array([[q, q]]))
  kl = rl.kl_exact(None, None, logprobs.shifted_log_softmax(logits),
                   logprobs.shifted_log_softmax(ref_logits))
  expected = 0.7 * math.log(0.7 / 0.4) + 0.3 * math.log(0.3 / 0.6)
  np.testing.assert_allclose(kl, [[0.0, expected]], rtol=1e-6)


def test_every_kl_is_zero_when_policy_equals_reference():
  cfg = model_lib.ModelConfig(vocab_size=31, num_layers=1, embed_dim=16, num_heads=2,
                              num_kv_heads=1, mlp_dim=24)
  params = model_lib.init(cfg, jax.random.key(0), stddev=0.3)
  tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, 31)
  mask = jnp.ones((2, 7), bool)
  logp, _ = logprobs.token_logprobs(params, tokens, mask, cfg)
  full = logprobs.shifted_log_softmax(model_lib.apply(params, tokens, cfg)[0])
  for name, fn in rl.KL_ESTIMATORS.items():
    np.testing.assert_allclose(fn(logp, logp, full, full), 0.0, atol=1e-6, err_msg=name)


def _expected_estimator_gradient(name, theta, ref_logp):
  """E_{v ~ pi}[grad_theta k(v)] over one categorical pi = softmax(theta), exactly: the
  sum over v weighted by pi(v), the weights not differentiated (v is sampled)."""
  fn = rl.KL_ESTIMATORS[name]

  def expectation(t):
    logp = jax.nn.log_softmax(t)
    weights = jax.lax.stop_gradient(jnp.exp(logp))
    return jnp.sum(weights * fn(logp[None], ref_logp[None])[0])

  return jax.grad(expectation)(theta)


def test_kl_estimator_gradients_point_where_the_docs_say():
  theta = jnp.array([0.3, -1.2, 0.8, 0.1])
  ref_logp = jax.nn.log_softmax(jnp.array([-0.5, 0.4, 0.2, 1.0]))
  forward = jax.grad(lambda t: jnp.sum(jnp.exp(jax.nn.log_softmax(t))
                                       * (jax.nn.log_softmax(t) - ref_logp)))(theta)
  reverse = jax.grad(lambda t: jnp.sum(jnp.exp(ref_logp)
                                       * (ref_logp - jax.nn.log_softmax(t))))(theta)
  np.testing.assert_allclose(_expected_estimator_gradient("k1", theta, ref_logp), 0.0,
                             atol=1e-6)
  np.testing.assert_allclose(_expected_estimator_gradient("k2", theta, ref_logp), forward,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_expected_estimator_gradient("k3", theta, ref_logp), reverse,
                             rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(forward - reverse)).max() > 1e-2  # The two really differ.


def test_kl_estimator_misuse_is_refused():
  with pytest.raises(ValueError, match="zero expected gradient.*kl_in_reward=True"):
    score_objective("II", kl_estimator="k1")
  with pytest.raises(ValueError, match="cannot be folded into the reward"):
    score_objective("II", kl_estimator="exact", kl_in_reward=True)
  score_objective("II", kl_estimator="k1", kl_in_reward=True,
                  sampling=sampler_lib.SamplingConfig(temperature=1.0))


@pytest.mark.parametrize("name", ["score", "pg", "grpo"])
def test_training_on_samples_not_drawn_from_the_policy_is_refused(name):
  # A tempered or truncated sampler makes REINFORCE, GRPO's ratio against pi_old and
  # KL on sampled tokens all off-policy, with or without KL in the reward.
  fields = {"stages": "II:1"} if name == "score" else {}
  for sampling in (sampler_lib.SamplingConfig(temperature=0.7),
                   sampler_lib.SamplingConfig(top_k=5), sampler_lib.SamplingConfig(top_p=0.9)):
    with pytest.raises(ValueError, match="sampler.temperature=1.0, sampler.top_k=0"):
      objectives.make(name, fields, objectives.Context(CFG, 2, 2, sampling))
  objectives.make(name, fields, objectives.Context(CFG, 2, 2, sampler_lib.SamplingConfig()))


@pytest.mark.parametrize("name", ["score", "pg"])
def test_one_update_per_batch_has_no_clipped_ratio_to_choose(name):
  # With one update per rollout batch pi = pi_old: the ratio is 1 and a clip never binds.
  fields = {"stages": "II:1"} if name == "score" else {}
  for field in ("policy_loss", "clip_eps"):
    with pytest.raises(ValueError, match=f"config {name}.{field} is not a field"):
      objectives.make(name, {**fields, field: "clipped" if field == "policy_loss" else 0.2},
                      objectives.Context(CFG, 2, 2))


def test_masked_advantages_count_only_the_samples_that_took_the_turn():
  # One group of 3: row 0 stopped correct after turn 1; rows 1 and 2 took turn 2, where
  # row 1 was right. Turn 2's leave-one-out baseline is row 2 for row 1 and row 1 for
  # row 2, never row 0's untaken turn.
  returns = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
  turns = jnp.array([[True, False], [True, True], [True, True]])
  np.testing.assert_allclose(rl.rloo_advantages(returns, 3, valid_BxN=turns),
                             [[1.0, 0.0], [-0.5, 1.0], [-0.5, -1.0]])
  # Group-normalised over the same samples: turn 2 is (1, 0) -> mean 1/2, std 1/2.
  np.testing.assert_allclose(rl.group_advantages(returns, 3, eps=0.0, valid_BxN=turns),
                             [[2 ** 0.5, 0.0], [-(2 ** -0.5), 1.0], [-(2 ** -0.5), -1.0]],
                             rtol=1e-6)
  # A turn only one sample took has no leave-one-out baseline: no advantage.
  one = jnp.array([[True, False], [True, True]])
  np.testing.assert_allclose(rl.rloo_advantages(returns[:2], 2, valid_BxN=one),
                             [[1.0, 0.0], [-1.0, 0.0]])
  # Every turn taken: the unmasked estimators.
  full = jnp.ones((3, 2), bool)
  np.testing.assert_allclose(rl.rloo_advantages(returns, 3, valid_BxN=full),
                             rl.rloo_advantages(returns, 3))
  np.testing.assert_allclose(rl.group_advantages(returns, 3, valid_BxN=full),
                             rl.group_advantages(returns, 3), rtol=1e-6)


def _trajectories(rewards_BxN, turns_BxN):
  """Two-turn rows of 4 tokens: two prompt tokens, then one token per turn taken."""
  b = rewards_BxN.shape[0]
  turn = np.array([[0, 0, 1, 2 if turns_BxN[i, 1] else 0] for i in range(b)])
  return objectives.Trajectories(
      tokens_BxT=jnp.ones((b, 4), jnp.int32), mask_BxT=jnp.asarray(turn[:, :] >= 0),
      turn_BxT=jnp.asarray(turn), behaviour_logp_BxT=jnp.zeros((b, 4)),
      ref_logp_BxT=jnp.zeros((b, 4)), rewards_BxN=jnp.asarray(rewards_BxN),
      turns_BxN=jnp.asarray(turns_BxN))


def test_stopping_feedback_masks_untaken_turns_in_pg_and_is_refused_by_score():
  rewards = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], np.float32)
  turns = np.array([[True, False], [True, True], [True, True]])
  ctx = objectives.Context(CFG, num_turns=2, group_size=3, stops_rows=True)
  obj = objectives.make("pg", {"advantage": "rloo"}, ctx)
  batch, _ = obj.make_batch(_trajectories(rewards, turns), 0)
  # Turn-2 tokens (position 3) of rows 1 and 2: +1 and -1, row 2's baseline being row 1
  # alone (counting row 0's untaken turn as reward 0 gave row 2 -0.5).
  np.testing.assert_allclose(batch.advantages_BxT[:, 3], [0.0, 1.0, -1.0])
  np.testing.assert_allclose(batch.advantages_BxT[:, 2], [1.0, -0.5, -0.5])
  # SCoRe's stages and bonus need both attempts of every episode: a row that stopped
  # correct at turn 1 would get -alpha for the attempt it never made.
  with pytest.raises(ValueError, match="rollout.feedback=instruction"):
    objectives.make("score", {"stages": "II:1"}, ctx)


def test_shifted_logprobs_match_log_softmax_by_hand():
  logits = jnp.array([[[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
  tokens = jnp.array([[0, 2, 1]])
  out = logprobs.shifted_logprobs(logits, tokens)
  z0 = math.log(1 + math.e + math.e**2)
  z1 = math.log(math.e + 2)
  np.testing.assert_allclose(out, [[0.0, 2.0 - z0, 0.0 - z1]], rtol=1e-6)


# (r1, r2): i->c, c->i, c->c, i->i
OUTCOMES = jnp.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])


def test_progress_bonus_is_on_the_last_turn_only():
  bonus = rl.progress_bonus(OUTCOMES, alpha=10.0)
  np.testing.assert_array_equal(bonus[:, 1], [10.0, -10.0, 0.0, 0.0])
  np.testing.assert_array_equal(bonus[:, 0], 0.0)


def test_score_stages_golden():
  returns_i, coef_i = score_objective("I").returns(OUTCOMES, 0)
  np.testing.assert_array_equal(returns_i, [[0, 1], [0, 0], [0, 1], [0, 0]])
  np.testing.assert_allclose(coef_i, [0.11, 0.01])
  returns_ii, coef_ii = score_objective("II").returns(OUTCOMES, 0)
  np.testing.assert_array_equal(returns_ii, [[0, 11], [1, -10], [1, 1], [0, 0]])
  np.testing.assert_allclose(coef_ii, [0.01, 0.01])


def test_progress_bonus_never_reaches_attempt_one_when_discounting():
  # gamma = 1: attempt 1's return is r1 + r2 (the trajectory's rewards), and the bonus
  # alpha * (r2 - r1) is credited to attempt 2 alone. Before the bonus was added after
  # discounting, i->c gave attempt 1 a return of 11 and c->c only 2.
  returns, _ = score_objective("II", gamma=1.0).returns(OUTCOMES, 0)
  np.testing.assert_array_equal(returns, [[1, 11], [1, -10], [2, 1], [0, 0]])
  returns, _ = score_objective("II", gamma=0.0).returns(OUTCOMES, 0)
  np.testing.assert_array_equal(returns, [[0, 11], [1, -10], [1, 1], [0, 0]])
  # Three turns at gamma 0.5: r = (0, 0, 1), bonus 10 on turn 3 only.
  returns, _ = score_objective("II", gamma=0.5, num_turns=3).returns(
      jnp.array([[0.0, 0.0, 1.0]]), 0)
  np.testing.assert_allclose(returns, [[0.25, 0.5, 11.0]])


def test_score_schedule():
  obj = objectives.make("score", {"stages": "I:2,II:1,I:1"},
                        objectives.Context(CFG, num_turns=2, group_size=2))
  assert [obj.phase(s) for s in range(5)] == ["I", "I", "II", "I", "I"]
  assert obj.num_steps == 4
  with pytest.raises(ValueError, match="score.stages='I:2,III:1'"):
    objectives.make("score", {"stages": "I:2,III:1"}, objectives.Context(CFG))
  with pytest.raises(ValueError, match="config score.alpah is not a field"):
    objectives.make("score", {"alpah": 1.0}, objectives.Context(CFG))


def test_rloo_and_group_advantages_golden():
  returns = jnp.array([[1.0], [0.0], [0.0], [3.0], [5.0], [7.0]])  # 2 prompts x 3 samples
  rloo = rl.rloo_advantages(returns, group_size=3)
  np.testing.assert_allclose(rloo[:, 0], [1.0, -0.5, -0.5, -3.0, 0.0, 3.0])
  grpo = rl.group_advantages(returns, group_size=3, eps=0.0)
  s1 = np.std([1.0, 0.0, 0.0])
  np.testing.assert_allclose(grpo[:3, 0], (np.array([1, 0, 0]) - 1 / 3) / s1, rtol=1e-6)
  np.testing.assert_allclose(grpo[3:, 0], [-1.224744871, 0.0, 1.224744871], rtol=1e-6)
  with pytest.raises(ValueError, match="multiple of group_size"):
    rl.rloo_advantages(returns, group_size=4)


def test_rloo_is_per_turn():
  returns = jnp.array([[1.0, 0.0], [0.0, 4.0]])
  np.testing.assert_allclose(rl.rloo_advantages(returns, 2), [[1.0, -4.0], [-1.0, 4.0]])


def test_discounted_returns():
  r = jnp.array([[1.0, 2.0, 4.0]])
  np.testing.assert_allclose(rl.discounted_returns(r, 0.0), r)
  np.testing.assert_allclose(rl.discounted_returns(r, 0.5), [[1 + 0.5 * 2 + 0.25 * 4, 4.0, 4.0]])


def test_per_turn_kl_weighting():
  turn = jnp.array([[0, 0, 1, 1, 0, 2, 2, 0]])
  coef = rl.turn_weights(turn, jnp.array([0.11, 0.01]))
  np.testing.assert_allclose(coef, [[0, 0, 0.11, 0.11, 0, 0.01, 0.01, 0]])
  kl = jnp.array([[5.0, 5.0, 1.0, 2.0, 5.0, 3.0, 4.0, 5.0]])
  np.testing.assert_allclose(rl.turn_sums(kl, turn, 2), [[3.0, 7.0]])


def test_kl_folded_into_reward():
  obj = score_objective("II", kl_in_reward=True, kl_estimator="k1")
  rewards = jnp.array([[0.0, 1.0], [0.0, 0.0]])
  turn = jnp.array([[1, 1, 2], [1, 2, 2]])
  kl = jnp.array([[1.0, 1.0, 2.0], [3.0, 1.0, 1.0]])
  returns, _ = obj.returns(rewards, 0, turn, kl)
  np.testing.assert_allclose(returns, [[0 - 0.01 * 2, 11 - 0.01 * 2], [0 - 0.01 * 3, 0 - 0.01 * 2]],
                             rtol=1e-6)


def test_aggregations():
  x = jnp.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
  mask = jnp.array([[1, 1, 1], [1, 0, 0]])
  assert float(rl.aggregate(x, mask, "token_mean")) == pytest.approx(10 / 4)
  assert float(rl.aggregate(x, mask, "sequence_mean")) == pytest.approx((2 + 4) / 2)
  assert float(rl.aggregate(x, mask, "sum")) == pytest.approx(10 / 2)


def test_dpo_loss_is_log2_when_policy_equals_reference():
  z = jnp.array([-3.0, -1.0])
  np.testing.assert_allclose(dpo.preference_loss(z, z + 1, z, z + 1, beta=0.1), math.log(2),
                             rtol=1e-6)


def test_clipped_ratio_loss():
  logp, old = jnp.log(jnp.array([1.5])), jnp.zeros(1)
  np.testing.assert_allclose(rl.clipped_ratio_loss(logp, jnp.array([2.0]), old, 0.2), [-2.4])
  np.testing.assert_allclose(rl.clipped_ratio_loss(logp, jnp.array([-2.0]), old, 0.2), [3.0])


# ---------------------------------------------------------------------------
# Per-token statistics from logits formed in chunks.


def _stats_loss(params, ref_params, tokens, cfg):
  """A scalar mixing every statistic, so gradients check all three."""
  x, _ = model_lib.apply(params, tokens, cfg, return_hidden=True)
  ref_x, _ = model_lib.apply(ref_params, tokens, cfg, return_hidden=True)
  logp, entropy, kl = logprobs.token_stats(params, x, tokens, cfg, ref_params, ref_x)
  return jnp.sum(logp * 0.7 + entropy * 0.2 + kl * 1.3), (logp, entropy, kl)


@pytest.mark.parametrize("chunk", [1, 3, 4, 7])
def test_token_stats_in_chunks_equal_the_whole_logits(chunk):
  params = model_lib.init(CFG, jax.random.key(0), stddev=0.3)
  ref_params = model_lib.init(CFG, jax.random.key(1), stddev=0.3)
  tokens = jax.random.randint(jax.random.key(2), (3, 8), 0, CFG.vocab_size)
  # Reference: the full B x T x V log-softmaxes, written out.
  full = lambda p: logprobs.shifted_log_softmax(model_lib.apply(p, tokens, CFG)[0])
  logp_V, ref_V = full(params), full(ref_params)
  want_logp = logprobs.taken_logprobs(logp_V, tokens)
  want_entropy = jnp.pad(-jnp.sum(jnp.exp(logp_V) * logp_V, -1), ((0, 0), (1, 0)))
  want_kl = rl.kl_exact(None, None, logp_V, ref_V)
  whole_grad, whole = jax.grad(_stats_loss, has_aux=True)(params, ref_params, tokens, CFG)
  chunked = CFG.replace(logits_chunk=chunk)  # 7 positions: chunks of 4 and 7 need padding.
  grad, got = jax.grad(_stats_loss, has_aux=True)(params, ref_params, tokens, chunked)
  for name, w, g, h in zip(("logp", "entropy", "kl"), (want_logp, want_entropy, want_kl),
                           got, whole):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(h, w, rtol=1e-5, atol=1e-6, err_msg=name)
  for (path, g), h in zip(jax.tree_util.tree_leaves_with_path(grad), jax.tree.leaves(whole_grad)):
    np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_chunked_logits_never_hold_every_position_at_once():
  """XLA's own memory analysis of the compiled loss gradient: with chunks its
  temporaries are below one B x T x V float32 logits array; without, they are above."""
  cfg = model_lib.ModelConfig(vocab_size=8192, num_layers=1, embed_dim=16, num_heads=2,
                              num_kv_heads=1, mlp_dim=24)
  params = model_lib.init(cfg, jax.random.key(0))
  tokens = jnp.zeros((4, 64), jnp.int32)
  logits_bytes = 4 * 64 * cfg.vocab_size * 4

  def temp_bytes(c):
    loss = lambda p: jnp.sum(logprobs.token_logprobs(p, tokens, jnp.ones_like(tokens, bool), c)[0])
    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

  whole, chunked = temp_bytes(cfg), temp_bytes(cfg.replace(logits_chunk=8))
  assert chunked < logits_bytes < whole and chunked < whole / 4, (chunked, whole)
