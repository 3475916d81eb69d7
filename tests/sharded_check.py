"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_sharding.py).

For each mesh, the SCoRe train step and a greedy two-turn sample on sharded params and
batches must match one device, and every parameter must be sharded as its rules say.
Sampling with finished rows compacted out of sharded batches (sampled, not greedy) must
equal one device decoding the whole batch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numerics import assert_close, assert_trees_close

from jaxscore import objectives
from jaxscore.infra import sharding
from jaxscore.loops import train as train_lib
from jaxscore.models import layers, logprobs
from jaxscore.models import model as model_lib
from jaxscore.objectives import policy_gradient as pg
from jaxscore.objectives import rl
from jaxscore.sampling import sampler as sampler_lib

assert jax.device_count() == 8, jax.devices()
CFG = model_lib.ModelConfig(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4,
                            num_kv_heads=2, mlp_dim=64)
B, L = 8, 12
# Both ways of running gate and up, sharded: the train step's B * L = 96 tokens as one
# matmul over the stacked weights, the sampler's decode steps (8 tokens) as two.
layers.STACK_GATE_UP_MIN_TOKENS = 64


def make_batch(params):
  tokens = jax.random.randint(jax.random.key(1), (B, L), 0, CFG.vocab_size)
  turn = jnp.tile(jnp.array([0, 0, 1, 1, 1, 1, 0, 2, 2, 2, 2, 0]), (B, 1))
  mask = jnp.ones((B, L), bool)
  rewards = jax.random.bernoulli(jax.random.key(2), 0.5, (B, 2)).astype(jnp.float32)
  score = objectives.make("score", {"stages": "II:1"},
                          objectives.Context(CFG, num_turns=2, group_size=4))
  returns, coef = score.returns(rewards, 0)
  adv = score.advantages(returns)
  ref_logp = logprobs.token_logprobs(params, tokens, mask, CFG)[0] - 0.1
  return pg.RLBatch(
      tokens_BxT=tokens, mask_BxT=mask, turn_BxT=turn,
      advantages_BxT=rl.turn_values(turn, adv), kl_coef_BxT=rl.turn_weights(turn, coef),
      ref_logp_BxT=ref_logp, old_logp_BxT=ref_logp)


def loss_fn(*args):
  return pg.policy_gradient_loss(
      *args, cfg=CFG, loss_cfg=pg.PolicyLossConfig(kl_estimator="exact"))


def run_step(params, batch, ref_params):
  """One SGD step (linear in the gradient: see numerics.py) and the gradient itself."""
  opt = optax.sgd(0.1)
  step = jax.jit(train_lib.make_train_step(loss_fn, opt))
  state = train_lib.TrainState.create(params, opt)
  grads = jax.jit(jax.grad(lambda p: loss_fn(p, batch, None, ref_params)[0]))(params)
  return step(state, batch, jax.random.key(0), ref_params), grads


def run_sampler(params, mesh=None, rules=None):
  rows = None if mesh is None else sharding.NamedSharding(
      mesh, sharding.PartitionSpec(dict(rules)["batch"]))
  smp = sampler_lib.Sampler(CFG, max_len=32, stop_ids=[63], end_of_turn_id=62,
                            batch_sharding=rows, rules=rules)
  prompts = [[1 + i, 2, 3 + i][: 2 + i % 2] for i in range(B)]
  greedy = sampler_lib.SamplingConfig(temperature=0.0, max_new_tokens=5)
  state = smp.generate(params, smp.start(prompts, jax.random.key(0)), greedy)
  state = smp.generate(params, smp.add_message(state, [[5, 6]] * B), greedy)
  if mesh is not None:  # The state kept the shardings the rules give it.
    for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(smp.state_shardings)):
      assert x.sharding.is_equivalent_to(s, x.ndim), (x.shape, x.sharding, s)
  return np.asarray(smp.episode(state).tokens_BxT)


def run_compacted(params, mesh=None, rules=None):
  """16 rows that run into the buffer's end at different steps, sampled at temperature
  1; compacted down to the row shards on a mesh, never on one device."""
  rows = None if mesh is None else sharding.NamedSharding(
      mesh, sharding.PartitionSpec(dict(rules)["batch"]))
  smp = sampler_lib.Sampler(CFG, max_len=48, stop_ids=[63], batch_sharding=rows,
                            rules=rules, min_compact_rows=None if mesh is None else 1)
  prompts = [[1 + (i + j) % 60 for j in range(2 + 2 * i)] for i in range(16)]
  sampling = sampler_lib.SamplingConfig(temperature=1.0, max_new_tokens=40)
  state = smp.generate(params, smp.start(prompts, jax.random.key(4)), sampling)
  if mesh is not None:
    assert smp.compacted_rows(16) == 8 and smp._compact._cache_size() >= 1
  return np.asarray(smp.episode(state).tokens_BxT)


params = model_lib.init(CFG, jax.random.key(0), stddev=0.3)
batch = make_batch(params)
(ref_state, ref_metrics), ref_grads = run_step(params, batch, params)
ref_tokens = run_sampler(params)
ref_compacted = run_compacted(params)

# (data, fsdp, tensor[, dcn]): the last is two slices of four devices, fsdp and tensor
# parallel inside each slice and data parallel across them.
for shape, rules_name in (((8, 1, 1), "data_parallel"), ((1, 8, 1), "fsdp"),
                          ((2, 2, 2), "fsdp_tp"), ((1, 2, 2, 2), "fsdp_tp")):
  mesh = sharding.make_mesh(*shape)
  rules = sharding.RULES[rules_name]
  if len(shape) == 4:
    devices = jax.devices()
    assert mesh.shape["dcn"] == 2 and set(mesh.devices[0].flat) == set(devices[:4])
  with sharding.activate(mesh, rules):
    sharded = sharding.init_sharded(CFG, jax.random.key(0), mesh, rules, stddev=0.3)
    assert_trees_close(sharded, params)
    expected = sharding.param_shardings(CFG, mesh, rules)
    for p, s in zip(jax.tree.leaves(sharded), jax.tree.leaves(expected)):
      assert p.sharding.is_equivalent_to(s, p.ndim), (p.sharding, s)
    if rules_name != "data_parallel":
      assert any(len(p.sharding.device_set) == 8 and not p.sharding.is_fully_replicated
                 for p in jax.tree.leaves(sharded))
    if len(shape) == 4:  # Each slice holds all the weights: the same block per position.
      for p in jax.tree.leaves(sharded):
        index = p.sharding.devices_indices_map(p.shape)
        for d0, d1 in zip(mesh.devices[0].flat, mesh.devices[1].flat):
          assert index[d0] == index[d1], (p.shape, p.sharding)
      batch_index = sharding.shard_batch(batch, mesh, rules).tokens_BxT.sharding
      rows = {d: batch_index.devices_indices_map((B, L))[d][0].indices(B) for d in devices}
      assert {rows[d] for d in mesh.devices[0].flat}.isdisjoint(
          {rows[d] for d in mesh.devices[1].flat})  # The slices see different rows.
    (state, metrics), grads = run_step(sharded, sharding.shard_batch(batch, mesh, rules),
                                       sharded)
    assert_close(metrics["loss"], ref_metrics["loss"], what="loss")
    assert_trees_close(grads, ref_grads)
    assert_trees_close(state.params, ref_state.params)
    np.testing.assert_array_equal(run_sampler(sharded), ref_tokens)
    np.testing.assert_array_equal(run_sampler(sharded, mesh, rules), ref_tokens)
    if len(shape) == 3:  # Compaction per row shard is the same code with or without dcn.
      np.testing.assert_array_equal(run_compacted(sharded, mesh, rules), ref_compacted)
  print(f"OK mesh={shape} rules={rules_name} loss={float(metrics['loss']):.6f}", flush=True)

# Bad meshes are errors before anything compiles.
for bad in ((3, 1, 1), (2, 2, 3)):
  try:
    sharding.make_mesh(*bad)
  except sharding.ShardingError as e:
    print("OK error:", e)
  else:
    raise AssertionError(f"mesh {bad} should not fit 8 devices")
odd = CFG.replace(num_heads=6, num_kv_heads=3, head_dim=8)
try:
  sharding.param_shardings(odd, sharding.make_mesh(2, 2, 2), sharding.RULES["fsdp_tp"])
except sharding.ShardingError as e:
  assert "heads=6" not in str(e) or "divisible" in str(e)
  print("OK error:", e)
else:
  raise AssertionError("3 kv heads cannot split over tensor=2")
