"""Run as `python off_policy_check.py OUT sampler_devices [lora]` under XLA_FLAGS with
enough fake CPU devices (see test_off_policy.py): four one-step-off-policy GRPO steps on
the tiny model, colocated (0) or with the last `sampler_devices` devices sampling, with
rank-4 adapters if `lora`. Writes the metrics and, per rollout, the devices and values
of the parameters it sampled with (and which arrays held the base)."""

import dataclasses
import json
import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_checkpoint import _metrics, _tiny_setup  # noqa: E402
from test_off_policy import _config  # noqa: E402

from jaxscore.loops import online  # noqa: E402
from jaxscore.models import lora, pretrained  # noqa: E402
from jaxscore.sampling import rollout as rollout_lib  # noqa: E402

out, sampler_devices = pathlib.Path(sys.argv[1]), int(sys.argv[2])
with_lora = sys.argv[3:] == ["lora"]
seen, held = [], []
original = rollout_lib.rollout


def rollout(params, *args, **kwargs):
  leaves = jax.tree.leaves(params)
  seen.append({"devices": sorted({d.id for x in leaves for d in x.devices()}),
               "sum": float(sum(np.asarray(x, np.float64).sum() for x in leaves)),
               "base_ids": [id(x) for x in jax.tree.leaves(lora.split(params)[0])]
               if with_lora else []})
  held.append(params)  # Keeps the ids above from being reused.
  ro = original(params, *args, **kwargs)
  seen[-1]["episode_devices"] = sorted(d.id for d in ro.episode.tokens_BxT.devices())
  return ro


rollout_lib.rollout = rollout
setup, params = _tiny_setup()
c = _config()
c.mesh.sampler_devices = sampler_devices
if with_lora:
  c.model.lora.rank = 4
  setup = dataclasses.replace(setup, cfg=setup.cfg.replace(lora=pretrained.lora_config(c.model)))
state, _ = online.train(c, setup, params, params, out)
(out / "check.json").write_text(json.dumps({
    "metrics": _metrics(out), "rollouts": seen, "devices": jax.device_count(),
    "param_devices": sorted({d.id for x in jax.tree.leaves(state.params)
                             for d in x.devices()}),
    "param_sum": float(sum(np.asarray(x, np.float64).sum()
                           for x in jax.tree.leaves(state.params)))}))
