"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_sharding.py).

A run's model loads straight onto its mesh, sharded as training shards it, and a greedy
evaluation on that mesh splits each call's rows over the batch axes (the KV cache with
them) and gives every problem the attempts and rewards one device gives it. So do the
samplers of STaR's and pair-SFT's rounds and of pass@k (the Replier, which Self-Explore
samples with): every real row samples what it samples on one device.
"""

import pathlib

import jax
import numpy as np
from test_checkpoint import _tiny_setup

from jaxscore import evaluate as evaluate_lib
from jaxscore import plan
from jaxscore.infra import sharding
from jaxscore.loops import self_training
from jaxscore.models import lora
from jaxscore.sampling import rollout
from jaxscore.sampling import sampler as sampler_lib

CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "score.py") + ":cpu"

assert jax.device_count() == 8, jax.devices()
leaves = jax.tree.leaves

# The embedded model loaded for an fsdp run over the 8 devices: every weight where
# training puts it, none of them whole on the first device.
c = plan.load_config(CONFIG)
c.mesh.rules, c.mesh.data, c.mesh.fsdp = "fsdp", 1, 8
setup, _, params = rollout.from_config(c)
mesh, rules = sharding.training_mesh(sharding.MeshConfig(**c.mesh))
for got, want in zip(leaves(params), leaves(sharding.param_shardings(setup.cfg, mesh, rules))):
  assert got.sharding == want, (got.sharding, want)
total = sum(a.nbytes for a in leaves(params))
first = sum(s.data.nbytes for a in leaves(params) for s in a.addressable_shards
            if s.device == jax.devices()[0])
assert first < 0.13 * total, (first, total)  # An eighth, and the norms whole.
print("OK load")

# QLoRA: the run holds the nf4 base alone, quantized where it lies: the same values as
# quantizing the full-precision weights, in the shardings training gives them.
c.model.lora.rank, c.model.lora.quantize = 4, "nf4"
qsetup, _, qparams = rollout.from_config(c)
want = lora.quantize_base(jax.device_get(params), qsetup.cfg)
assert jax.tree.structure(qparams) == jax.tree.structure(want)
for t in lora.TARGETS:
  assert lora.is_quantized(qparams["layers"][t]), t
for got, w, s in zip(leaves(qparams), leaves(want),
                     leaves(lora.split(sharding.param_shardings(qsetup.cfg, mesh, rules))[0])):
  np.testing.assert_array_equal(np.asarray(got), np.asarray(w))
  assert got.sharding == s, (got.sharding, s)
# Projections at half a byte (plus a float32 scale per 64 inputs); embeddings, norms as
# they were: a third of the float32 model.
qtotal = sum(a.size * jax.dtypes.itemsize_bits(a.dtype) / 8 for a in leaves(qparams))
assert qtotal < 0.33 * total, (qtotal, total)
del qparams, want
print("OK qlora load")

# Greedy evaluation of a tiny model: params on one device against params fsdp-sharded
# over the mesh (11 problems in calls of 5 rows, which the mesh rounds up to 8).
tiny, tiny_params = _tiny_setup()
problems = list(tiny.task.problems("test"))[:11]
kw = dict(num_turns=2, max_new_tokens=6, batch_size=5)
one_metrics, one_records = evaluate_lib.evaluate(
    jax.device_put(tiny_params, jax.devices()[0]), tiny, problems, **kw)
sharded = jax.device_put(tiny_params, sharding.param_shardings(tiny.cfg, mesh, rules))
metrics, records = evaluate_lib.evaluate(sharded, tiny, problems, rules=rules, **kw)
assert records == one_records, (records, one_records)
assert metrics == one_metrics, (metrics, one_metrics)
# The sampler the sharded evaluation used (`Sampler.shared`: the same arguments give the
# same one): rows and cache split 8 ways.
hits = sampler_lib._shared.cache_info().hits
smp = rollout.make_sampler(
    tiny, rollout.prompt_lens(tiny, problems), 2, 6,
    message_len=rollout.instruction_len(tiny, rollout.Feedback()),
    batch_sharding=sharding.rows_sharding(sharded, rules), rules=rules)
assert sampler_lib._shared.cache_info().hits == hits + 1
assert smp.row_shards == 8
cache = smp.state_shardings.cache
for kv in (cache.k_LxBxSxKxH, cache.v_LxBxSxKxH):
  assert kv.spec[1] == ("dcn", "data", "fsdp"), kv
print("OK evaluate")

# Self-training rounds, sampled at temperature 1: 5 problems x 2 samples, 3 problems
# (6 rows) per call, which the mesh pads to 8 rows with copies of the last problem.
one = jax.device_put(tiny_params, jax.devices()[0])
kw = dict(num_turns=2, group_size=2, temperature=1.0, max_new_tokens=6, batch_size=6,
          seed=3, round_index=1)
results = []
for p in (one, sharded):
  smp = self_training.make_sampler(tiny, problems, 2, 6, p, rules)
  assert smp.row_shards == (8 if p is sharded else 1), smp.row_shards
  results.append(self_training.sample(p, tiny, smp, problems[:5], **kw))
(one_batches, one_used, one_tokens), (batches, used, tokens) = results
assert (used, tokens) == (one_used, one_tokens) == (5, one_tokens), (used, tokens, one_tokens)
for (ro, real), (one_ro, one_real) in zip(batches, one_batches, strict=True):
  assert real == one_real
  assert [t[:real] for t in ro.texts] == [t[:real] for t in one_ro.texts]
  assert (ro.rewards_BxN[:real] == one_ro.rewards_BxN[:real]).all()
assert len({t for ro, real in batches for t in ro.texts[0][:real]}) > 1  # Sampled.
print("OK self-training")

# pass@k: 5 problems x 2 samples in calls of 6 rows (3 prompts, padded to 4 on the mesh).
kw = dict(num_samples=2, temperature=1.0, max_new_tokens=6, batch_size=6, seed=2)
one_metrics, one_records = evaluate_lib.evaluate_pass_at_k(one, tiny, problems[:5], **kw)
metrics, records = evaluate_lib.evaluate_pass_at_k(sharded, tiny, problems[:5], rules=rules,
                                                   **kw)
assert records == one_records, (records, one_records)
assert metrics == one_metrics, (metrics, one_metrics)
print("OK pass@k")
