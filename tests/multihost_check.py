"""One process of a two-process run on 127.0.0.1 (see test_multihost.py).

  python tests/multihost_check.py PORT PROCESS_ID WORKDIR
"""

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

jax.config.update("jax_cpu_collectives_implementation", "gloo")
from jaxscore import evaluate  # pylint: disable=g-import-not-at-top
from jaxscore.infra import (
                            distributed,  # pylint: disable=g-import-not-at-top
                            sharding,
)
from jaxscore.loops import common, online  # pylint: disable=g-import-not-at-top
from jaxscore.sampling import rollout  # pylint: disable=g-import-not-at-top

port, process_id, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2

import test_checkpoint as t  # pylint: disable=g-import-not-at-top

setup, params = t._tiny_setup()
c = t._config()
c.score.stages = "I:2,II:1"
state, info = online.train(c, setup, params, params, workdir, stop_after=2)
assert info["step"] == 2, info
state, info = online.train(c, setup, params, params, workdir)  # Resumes from step 2.
assert info["step"] == 3, info
leaves = jax.tree.leaves(state.params)
assert any(not x.is_fully_addressable for x in leaves)  # Really spread over both hosts.
digest = float(sum(np.abs(sharding.to_host(x)).sum() for x in leaves))

# Greedy evaluation of the trained params where they are (rows split over both hosts),
# and a model loaded from its file straight onto the two hosts' mesh.
problems = list(setup.task.problems("test"))[:6]
rules = common.mesh_from_config(c)[1]
metrics, records = evaluate.evaluate(state.params, setup, problems, num_turns=2,
                                     max_new_tokens=4, batch_size=3, rules=rules)
# pass@k's sampler (the Replier) too: 3 problems x 2 samples, one problem per call,
# padded to two so that each call's 4 rows split over the 4 devices of both hosts.
passk, passk_records = evaluate.evaluate_pass_at_k(
    state.params, setup, problems[:3], num_samples=2, temperature=1.0, max_new_tokens=4,
    batch_size=2, rules=rules)
c.mesh.rules, c.mesh.data, c.mesh.fsdp = "fsdp", 1, -1
_, _, loaded = rollout.from_config(c)
assert all(not x.is_fully_addressable for x in jax.tree.leaves(loaded))
print("RESULT", json.dumps({"process": jax.process_index(), "step": info["step"],
                            "digest": digest, "evaluation": [metrics, [
                                (r["attempts"], r["rewards"]) for r in records]],
                            "pass@k": [passk, passk_records]}), flush=True)
