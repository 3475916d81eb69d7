"""Train steps: gradient routing, a one-step golden test, learning on a toy task,
and data parallelism on 8 fake CPU devices."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxscore import objectives
from jaxscore.loops import train as train_lib
from jaxscore.models import logprobs
from jaxscore.models import model as model_lib
from jaxscore.objectives import policy_gradient as pg
from jaxscore.objectives import rl
from jaxscore.sampling import sampler as sampler_lib

CFG = model_lib.ModelConfig(vocab_size=13, num_layers=2, embed_dim=16, num_heads=2,
                            num_kv_heads=1, mlp_dim=24)
# Two rows: prompt (turn 0), attempt 1, instruction (turn 0), attempt 2, padding.
TURN = jnp.array([[0, 0, 1, 1, 0, 2, 2, 0],
                  [0, 1, 1, 1, 0, 2, 0, 0]])
MASK = jnp.array([[1] * 7 + [0], [1] * 6 + [0, 0]])


def _batch(advantages_BxN, coef_N, seed=0):
  tokens = jax.random.randint(jax.random.key(seed), TURN.shape, 0, CFG.vocab_size)
  return pg.RLBatch(
      tokens_BxT=tokens, mask_BxT=MASK, turn_BxT=TURN,
      advantages_BxT=rl.turn_values(TURN, jnp.asarray(advantages_BxN, jnp.float32)),
      kl_coef_BxT=rl.turn_weights(TURN, jnp.asarray(coef_N, jnp.float32)),
      ref_logp_BxT=jnp.full(TURN.shape, -2.0), old_logp_BxT=jnp.full(TURN.shape, -2.0))


@pytest.mark.parametrize("kl", ["k2", "k3"])
def test_gradient_reaches_only_response_tokens_of_their_turn(kl):
  batch = _batch([[1.0, -2.0], [0.5, 3.0]], [0.11, 0.01])
  loss_cfg = pg.PolicyLossConfig(kl_estimator=kl)
  logp = jnp.full(TURN.shape, -1.5)
  grad = jax.grad(lambda lp: pg.token_objective(lp, batch, loss_cfg)[0])(logp)
  response = np.asarray((TURN > 0) & (MASK > 0))
  np.testing.assert_array_equal(np.asarray(grad)[~response], 0.0)
  assert (np.abs(np.asarray(grad)[response]) > 0).all()


def test_stage_one_gives_attempt_one_no_reward_gradient():
  obj = objectives.make("score", {"stages": "I:1", "beta1": 0.0, "beta2": 0.0},
                        objectives.Context(CFG, num_turns=2, group_size=2))
  rewards = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
  returns, coef = obj.returns(rewards, 0)
  adv = obj.advantages(returns)
  np.testing.assert_array_equal(adv[:, 0], 0.0)
  assert np.abs(np.asarray(adv[:, 1])).sum() > 0
  batch = _batch(adv[:2], coef)
  logp = jnp.full(TURN.shape, -1.5)
  grad = jax.grad(lambda lp: pg.token_objective(
      lp, batch, pg.PolicyLossConfig())[0])(logp)
  np.testing.assert_array_equal(np.asarray(grad)[np.asarray(TURN == 1)], 0.0)
  assert np.abs(np.asarray(grad)[np.asarray(TURN == 2)]).sum() > 0


def _reference_loss(params, batch, beta_by_turn, adv_by_row_turn):
  """A second implementation: explicit loops over tokens, k3 KL, token mean."""
  logits, _ = model_lib.apply(params, batch.tokens_BxT, CFG, mask_BxT=batch.mask_BxT)
  logp_all = jax.nn.log_softmax(logits, axis=-1)
  terms = []
  for b in range(TURN.shape[0]):
    for t in range(1, TURN.shape[1]):
      turn = int(TURN[b, t])
      if turn == 0 or not MASK[b, t]:
        continue
      lp = logp_all[b, t - 1, batch.tokens_BxT[b, t]]
      r = batch.ref_logp_BxT[b, t] - lp
      kl = jnp.exp(r) - r - 1
      terms.append(-adv_by_row_turn[b][turn - 1] * lp + beta_by_turn[turn - 1] * kl)
  return sum(terms) / len(terms)


def test_one_train_step_golden():
  params = model_lib.init(CFG, jax.random.key(0), stddev=0.3)
  adv, coef = [[1.0, -2.0], [0.5, 3.0]], [0.11, 0.01]
  batch = _batch(adv, coef, seed=1)
  lr = 1e-3
  opt = train_lib.make_optimizer(train_lib.OptimConfig(learning_rate=lr, max_grad_norm=0.0))
  loss_fn = lambda p, b, r, ref: pg.policy_gradient_loss(
      p, b, r, ref, cfg=CFG, loss_cfg=pg.PolicyLossConfig(kl_estimator="k3"))
  step = jax.jit(train_lib.make_train_step(loss_fn, opt))
  state = train_lib.TrainState.create(params, opt)
  new_state, metrics = step(state, batch, jax.random.key(0))
  ref_loss, ref_grads = jax.value_and_grad(_reference_loss)(params, batch, coef, adv)
  np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)
  # Adam's first step moves each weight by lr * g / (|g| + eps) (bias-corrected).
  expected = jax.tree.map(lambda p, g: p - lr * g / (jnp.abs(g) + 1e-8), params, ref_grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), new_state.params, expected)
  assert int(new_state.step) == 1


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "sum"])
def test_micro_batches_give_the_whole_batch_gradient(aggregation):
  """Four rows of uneven response lengths in 2 or 4 slices: the loss, the gradient and
  the update are the whole batch's (float32 rounding), for every aggregation; token
  counts add up and maxima stay maxima."""
  params = model_lib.init(CFG, jax.random.key(0), stddev=0.3)
  halves = [_batch([[1.0, -2.0], [0.5, 3.0]], [0.11, 0.01], seed=s) for s in (1, 2)]
  batch = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), *halves)
  batch = batch.replace(mask_BxT=batch.mask_BxT.at[2, 3:].set(0))  # Row 2: 1 token.
  loss_cfg = pg.PolicyLossConfig(kl_estimator="k3", policy_loss="clipped", clip_eps=0.2,
                                 aggregation=aggregation)
  loss_fn = lambda p, b, r, ref: pg.policy_gradient_loss(p, b, r, ref, cfg=CFG,
                                                         loss_cfg=loss_cfg)
  weight = lambda b: pg.batch_weight(b, loss_cfg)
  whole = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, None, None)
  opt = train_lib.make_optimizer(train_lib.OptimConfig(learning_rate=1e-3))
  state = train_lib.TrainState.create(params, opt)
  want_state, want = jax.jit(train_lib.make_train_step(loss_fn, opt))(
      state, batch, jax.random.key(0))
  for slices in ((2, 4) if aggregation == "token_mean" else (2,)):
    (loss, metrics), grads = jax.jit(train_lib.accumulated_grad(loss_fn, slices, weight))(
        params, batch, jax.random.key(0), None)
    np.testing.assert_allclose(loss, whole[0][0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 grads, whole[1])
    assert metrics["tokens/response"] == whole[0][1]["tokens/response"]
    np.testing.assert_allclose(metrics["policy/ratio_max_dev"],
                               whole[0][1]["policy/ratio_max_dev"], rtol=1e-6)
    if aggregation == "token_mean":  # Token means are exact when tokens weigh slices.
      np.testing.assert_allclose(metrics["kl/mean"], whole[0][1]["kl/mean"], rtol=1e-5)
    new_state, m = jax.jit(train_lib.make_train_step(loss_fn, opt, micro_batches=slices,
                                                     batch_weight=weight))(
        state, batch, jax.random.key(0))
    np.testing.assert_allclose(m["grad_norm"], want["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 new_state.params, want_state.params)
  with pytest.raises(ValueError, match="does not split into optim.micro_batches=3"):
    train_lib.accumulated_grad(loss_fn, 3, weight)(params, batch, jax.random.key(0), None)


def test_sliced_reference_logprobs_equal_the_whole_batch():
  params = model_lib.init(CFG, jax.random.key(0), stddev=0.3)
  tokens = jax.random.randint(jax.random.key(1), (4, 8), 0, CFG.vocab_size)
  mask = jnp.concatenate([MASK, MASK[::-1]])
  whole = logprobs.token_logprobs(params, tokens, mask, CFG)[0]
  np.testing.assert_allclose(logprobs.sliced_token_logprobs(params, tokens, mask, CFG, 2), whole,
                             rtol=1e-6, atol=1e-6)


def test_score_raises_reward_on_a_toy_task():
  """Reward 1 when an attempt starts with token 7; two-turn SCoRe stage II, RLOO."""
  cfg = model_lib.ModelConfig(vocab_size=12, num_layers=1, embed_dim=16, num_heads=2,
                              num_kv_heads=1, mlp_dim=32)
  params = model_lib.init(cfg, jax.random.key(0), stddev=0.2)
  ref_params = jax.tree.map(jnp.copy, params)
  opt = train_lib.make_optimizer(train_lib.OptimConfig(learning_rate=3e-2))
  loss_cfg = pg.PolicyLossConfig(kl_estimator="k3")
  step = jax.jit(train_lib.make_train_step(
      lambda *a: pg.policy_gradient_loss(*a, cfg=cfg, loss_cfg=loss_cfg), opt))
  ref_logp_fn = jax.jit(lambda p, t, m: logprobs.token_logprobs(p, t, m, cfg)[0])
  smp = sampler_lib.Sampler(cfg, max_len=16, stop_ids=[11])
  sampling = sampler_lib.SamplingConfig(temperature=1.0, max_new_tokens=2)
  score = objectives.make("score", {"stages": "II:40", "alpha": 1.0, "beta1": 0.001},
                          objectives.Context(cfg, num_turns=2, group_size=4))
  state = train_lib.TrainState.create(params, opt)
  history = []

  def p_target(p, context):  # Exact policy probability of starting an attempt with 7.
    logits, _ = model_lib.apply(p, jnp.array([context]), cfg)
    return float(jax.nn.softmax(logits[0, -1])[7])

  before = p_target(params, [1, 2, 3])
  for i in range(40):
    st = smp.start([[1, 2, 3]] * 16, jax.random.key(i))
    st = smp.generate(state.params, st, sampling)
    st = smp.generate(state.params, smp.add_message(st, [[4]] * 16), sampling)
    ep = smp.episode(st)
    rewards = np.array([[float(r[:1] == [7]) for r in ep.response_ids(t)] for t in (1, 2)]).T
    history.append(rewards.mean())
    returns, coef = score.returns(jnp.asarray(rewards), i)
    adv = score.advantages(returns)
    mask = jnp.arange(16)[None] < ep.length_B[:, None]
    batch = pg.RLBatch(
        tokens_BxT=ep.tokens_BxT, mask_BxT=mask, turn_BxT=ep.turn_BxT,
        advantages_BxT=rl.turn_values(ep.turn_BxT, adv),
        kl_coef_BxT=rl.turn_weights(ep.turn_BxT, coef),
        ref_logp_BxT=ref_logp_fn(ref_params, ep.tokens_BxT, mask), old_logp_BxT=ep.logp_BxT)
    state, _ = step(state, batch, jax.random.key(i), ref_params)
  after = p_target(state.params, [1, 2, 3])
  assert before < 0.2 and after > 0.6, (before, after)
  assert np.mean(history[-5:]) > np.mean(history[:2]) + 0.3, history


_DATA_PARALLEL = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import jax, jax.numpy as jnp, numpy as np, optax
    from numerics import assert_close, assert_trees_close
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jaxscore.models import model as model_lib
    from jaxscore.objectives import policy_gradient as pg, rl
    from jaxscore.loops import train as train_lib
    assert jax.device_count() == 8, jax.devices()
    cfg = model_lib.ModelConfig(vocab_size=13, num_layers=2, embed_dim=16, num_heads=2,
                                num_kv_heads=1, mlp_dim=24)
    params = model_lib.init(cfg, jax.random.key(0), stddev=0.3)
    b, l = 8, 10
    tokens = jax.random.randint(jax.random.key(1), (b, l), 0, 13)
    turn = jnp.tile(jnp.array([0, 0, 1, 1, 1, 0, 2, 2, 2, 0]), (b, 1))
    adv = jax.random.normal(jax.random.key(2), (b, 2))
    batch = pg.RLBatch(tokens_BxT=tokens, mask_BxT=jnp.ones((b, l), bool), turn_BxT=turn,
        advantages_BxT=rl.turn_values(turn, adv),
        kl_coef_BxT=rl.turn_weights(turn, jnp.array([0.11, 0.01])),
        ref_logp_BxT=jnp.full((b, l), -2.5), old_logp_BxT=jnp.full((b, l), -2.5))
    opt = optax.sgd(0.1)  # Linear in the gradient (see numerics.py).
    loss_fn = lambda *a: pg.policy_gradient_loss(*a, cfg=cfg,
        loss_cfg=pg.PolicyLossConfig())
    step = train_lib.make_train_step(loss_fn, opt)
    state = train_lib.TrainState.create(params, opt)
    one = jax.jit(step)(state, batch, jax.random.key(0))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = NamedSharding(mesh, P("data"))
    repl = NamedSharding(mesh, P())
    sharded_batch = jax.tree.map(lambda x: jax.device_put(x, rows), batch)
    sharded_state = jax.tree.map(lambda x: jax.device_put(x, repl), state)
    eight = jax.jit(step)(sharded_state, sharded_batch, jax.random.key(0))
    assert len(sharded_batch.tokens_BxT.sharding.device_set) == 8
    assert_close(eight[1]["loss"], one[1]["loss"])
    grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, None, None)[0]))
    assert_trees_close(grad(sharded_state.params, sharded_batch), grad(params, batch))
    assert_trees_close(eight[0].params, one[0].params)
    print("loss", float(one[1]["loss"]), float(eight[1]["loss"]))
""")


def test_train_step_on_8_fake_devices_matches_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _DATA_PARALLEL, os.path.dirname(__file__)],
                       env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "loss" in out.stdout


def test_rmsprop_matches_pytorch_rmsprop():
  """Self-Explore's DPO optimizer is the reference code's: PyTorch's RMSprop (through
  transformers' optim="rmsprop") with its default decay 0.99 and eps outside the root."""
  from conftest import require_torch

  torch = require_torch()
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(3, 4)).astype(np.float32)
  # Gradients down to 1e-4: eps (1e-8) inside or outside the root tells at their squares.
  grads = [rng.normal(size=(3, 4)).astype(np.float32) * 10 ** -k for k in (0, 1, 2, 3, 4, 4)]
  opt = train_lib.make_optimizer(train_lib.OptimConfig(
      optimizer="rmsprop", learning_rate=1e-2, b2=0.99, max_grad_norm=0.0))
  w = jnp.asarray(w0)
  state = opt.init(w)
  tw = torch.tensor(w0.copy(), requires_grad=True)
  topt = torch.optim.RMSprop([tw], lr=1e-2)  # alpha=0.99, eps=1e-8 by default.
  for g in grads:
    updates, state = opt.update(jnp.asarray(g), state, w)
    w = optax.apply_updates(w, updates)
    tw.grad = torch.tensor(g)
    topt.step()
  np.testing.assert_allclose(np.asarray(w), tw.detach().numpy(), rtol=1e-6, atol=2e-7)
