"""RL building blocks against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscore import model as model_lib
from jaxscore import objectives, rl


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
  kl = rl.kl_exact(None, None, logits, ref_logits)
  expected = 0.7 * math.log(0.7 / 0.4) + 0.3 * math.log(0.3 / 0.6)
  np.testing.assert_allclose(kl, [[0.0, expected]], rtol=1e-6)


def test_every_kl_is_zero_when_policy_equals_reference():
  cfg = model_lib.ModelConfig(vocab_size=31, num_layers=1, embed_dim=16, num_heads=2,
                              num_kv_heads=1, mlp_dim=24)
  params = model_lib.init(cfg, jax.random.key(0), stddev=0.3)
  tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, 31)
  mask = jnp.ones((2, 7), bool)
  logp, logits = rl.token_logprobs(params, tokens, mask, cfg)
  for name, fn in rl.KL_ESTIMATORS.items():
    np.testing.assert_allclose(fn(logp, logp, logits, logits), 0.0, atol=1e-6, err_msg=name)


def test_shifted_logprobs_match_log_softmax_by_hand():
  logits = jnp.array([[[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
  tokens = jnp.array([[0, 2, 1]])
  out = rl.shifted_logprobs(logits, tokens)
  z0 = math.log(1 + math.e + math.e**2)
  z1 = math.log(math.e + 2)
  np.testing.assert_allclose(out, [[0.0, 2.0 - z0, 0.0 - z1]], rtol=1e-6)


def test_progress_bonus_rewards_at_alpha_10():
  # (r1, r2): i->c, c->i, c->c, i->i
  rewards = jnp.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
  shaped = rl.progress_bonus(rewards, alpha=10.0)
  np.testing.assert_array_equal(shaped[:, 1], [11.0, -10.0, 1.0, 0.0])
  np.testing.assert_array_equal(shaped[:, 0], rewards[:, 0])


def test_score_stages_golden():
  c = objectives.ScoreConfig(alpha=10.0, beta1=0.01, beta2=0.1)
  rewards = jnp.array([[0.0, 1.0], [1.0, 0.0]])
  np.testing.assert_array_equal(objectives.shaped_returns(rewards, "I", c), [[0, 1], [0, 0]])
  np.testing.assert_array_equal(objectives.shaped_returns(rewards, "II", c), [[0, 11], [1, -10]])
  np.testing.assert_allclose(objectives.kl_coefficients("I", 2, c), [0.11, 0.01])
  np.testing.assert_allclose(objectives.kl_coefficients("II", 2, c), [0.01, 0.01])


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
  c = objectives.ScoreConfig(alpha=10.0, beta1=0.01, beta2=0.1, kl_in_reward=True)
  rewards = jnp.array([[0.0, 1.0], [0.0, 0.0]])
  turn = jnp.array([[1, 1, 2], [1, 2, 2]])
  kl = jnp.array([[1.0, 1.0, 2.0], [3.0, 1.0, 1.0]])
  _, returns, _ = objectives.advantages(rewards, "II", c, 2, turn, kl)
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
  np.testing.assert_allclose(rl.dpo_loss(z, z + 1, z, z + 1, beta=0.1), math.log(2), rtol=1e-6)


def test_clipped_ratio_loss():
  logp, old = jnp.log(jnp.array([1.5])), jnp.zeros(1)
  np.testing.assert_allclose(rl.clipped_ratio_loss(logp, jnp.array([2.0]), old, 0.2), [-2.4])
  np.testing.assert_allclose(rl.clipped_ratio_loss(logp, jnp.array([-2.0]), old, 0.2), [3.0])
