"""Sampling one step ahead (`rollout.off_policy_steps=1`): which parameters sample each
step, exact resume, and the objectives that may not take stale samples."""

import concurrent.futures
import pathlib
import sys

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from test_checkpoint import _metrics, _tiny_setup  # noqa: E402

from configs import score  # noqa: E402
from jaxscore import config_checks  # noqa: E402
from jaxscore.infra import checkpoint as checkpoint_lib  # noqa: E402
from jaxscore.infra import sharding  # noqa: E402
from jaxscore.loops import common, online  # noqa: E402


def _config(off_policy_steps: int = 1, steps: int = 4):
  c = score.get_config("cpu,runlocal")
  c.objective = "grpo"
  c.grpo.num_steps, c.grpo.epochs, c.grpo.minibatches = steps, 1, 1
  c.optim.learning_rate = 1e-2  # Large enough that every update moves the policy.
  c.rollout.num_turns, c.rollout.feedback = 1, "instruction"
  c.rollout.prompts_per_step, c.rollout.group_size = 2, 2
  c.rollout.off_policy_steps = off_policy_steps
  c.sampler.max_new_tokens = 4
  c.checkpoint.every_steps, c.checkpoint.keep = 1, 10
  c.log.transcripts_every = 1
  return c


def _recording(monkeypatch):
  """Every rollout the loop samples: (step, tokens, sampler log-probs)."""
  seen = []
  original = online.OnlineLoop.rollout

  def rollout(self, policy, step, pool):
    ro = original(self, policy, step, pool)
    seen.append((step, np.asarray(ro.episode.tokens_BxT), np.asarray(ro.episode.logp_BxT)))
    return ro

  monkeypatch.setattr(online.OnlineLoop, "rollout", rollout)
  return seen


def _params_at(c, workdir, setup, params, step: int):
  return common.restore_params(c, workdir, setup.cfg, params, str(step))[0]


def _behaviour_at(workdir, params, step: int):
  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=1 << 30, read_only=True)
  try:
    abstract = {"behaviour_params": checkpoint_lib.abstract_like(params)}
    return ckpt.restore(abstract, step=step, partial=True)[0]["behaviour_params"]
  finally:
    ckpt.close()


@pytest.mark.slow
def test_each_step_is_sampled_by_the_previous_steps_parameters(tmp_path, monkeypatch):
  setup, params = _tiny_setup()
  c = _config()
  seen = _recording(monkeypatch)
  # A tiny random model answers nothing, so every reward is 0 and the advantages vanish:
  # a reference other than the initial policy gives the KL term a gradient, so that
  # each update moves the policy by more than float32 rounding.
  ref_params = jax.tree.map(lambda x: x * 1.05, params)
  online.train(c, setup, params, ref_params, tmp_path)
  assert [s for s, _, _ in seen] == [0, 1, 2, 3]
  m = _metrics(tmp_path)
  assert [r["off_policy/staleness"] for r in m] == [0, 1, 1, 1]
  # The parameters before each update: the initial ones, then each checkpoint's (saved
  # before its step's update).
  before = [params] + [_params_at(c, tmp_path, setup, params, t) for t in (1, 2, 3)]
  for t in (1, 2, 3):  # The checkpoint keeps what samples its step: the step before's.
    jax.tree.map(np.testing.assert_array_equal, _behaviour_at(tmp_path, params, t),
                 before[t - 1])
  objective = online.make_objective(c, setup)
  mesh, rules = common.mesh_from_config(c)
  with sharding.activate(mesh, rules), concurrent.futures.ThreadPoolExecutor(2) as pool:
    loop = online.OnlineLoop(c, setup, objective, tmp_path / "direct", mesh, rules)
    for t in (1, 2, 3):
      # Sampled directly from step t - 1's parameters: the same tokens and log-probs.
      ro = loop.rollout(before[t - 1], t, pool)
      np.testing.assert_array_equal(np.asarray(ro.episode.tokens_BxT), seen[t][1])
      np.testing.assert_array_equal(np.asarray(ro.episode.logp_BxT), seen[t][2])
      # Step t's own parameters sample something else: the check can tell them apart.
      ro = loop.rollout(before[t], t, pool)
      assert not np.array_equal(np.asarray(ro.episode.logp_BxT), seen[t][2])


@pytest.mark.slow
def test_an_off_policy_run_resumes_exactly(tmp_path):
  setup, params = _tiny_setup()
  c = _config()
  straight, _ = online.train(c, setup, params, params, tmp_path / "a")
  _, info = online.train(c, setup, params, params, tmp_path / "b", stop_after=2)
  assert info["step"] == 2
  resumed, info = online.train(c, setup, params, params, tmp_path / "b")
  assert info["step"] == 4
  jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)
  jax.tree.map(np.testing.assert_array_equal, resumed.opt_state, straight.opt_state)
  assert _metrics(tmp_path / "b") == _metrics(tmp_path / "a")


def test_only_objectives_that_correct_for_stale_samples_take_them():
  c = _config()
  config_checks.check_experiment(c)  # grpo: its ratio is against the behaviour log-probs.
  for objective in ("score", "pg"):
    c.objective = objective
    with pytest.raises(config_checks.ConfigError,
                       match=f"rollout.off_policy_steps=1.*{objective}"):
      config_checks.check_experiment(c)
  c.objective = "grpo"
  c.rollout.off_policy_steps = 2
  with pytest.raises(config_checks.ConfigError, match="rollout.off_policy_steps=2"):
    config_checks.check_experiment(c)


@pytest.mark.slow
def test_plan_counts_the_sampler_running_beside_the_update(tmp_path):
  """Off-policy, the next step's sampler (its KV cache and a copy of the weights) is
  resident while the train step runs: plan adds that phase and the two copies."""
  from test_plan import _plan, _tiny

  tiny = _tiny(tmp_path)
  outs = {}
  for steps in (0, 1):
    out = _plan("--config=configs/score.py:cpu", "--hbm_gib=4", f"--model={tiny}",
                "--prompt_len=32", "--config.objective=grpo", "--config.model.remat=none",
                f"--config.rollout.off_policy_steps={steps}")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    outs[steps] = out.stdout
  assert "sampling ahead" not in outs[0] and "behaviour params" not in outs[0]
  resident = next(l for l in outs[1].splitlines() if "resident:" in l)
  weights = float(resident.split("weights ")[1].split()[0].rstrip(","))
  copies = float(resident.split("behaviour params ")[1].split()[0].rstrip(","))
  assert copies == pytest.approx(2 * weights, rel=0.02)
  phases = [l.strip() for l in outs[1].splitlines() if "GiB per device" in l]
  ahead = next(l for l in phases if l.startswith("train step + sampling ahead"))
  train = next(l for l in phases if l.startswith("train step ") and "ahead" not in l)
  peak = lambda line: float(line.split("GiB")[0].split()[-1])
  assert peak(ahead) > peak(train)


@pytest.mark.parametrize("rows, group_size, shards, parts, pad", [
    (16, 1, 2, 1, 0),   # Already split.
    (16, 1, 3, 1, 2),   # 18 = 3 x 6.
    (16, 4, 3, 1, 8),   # 6 groups of 4: 2 groups per device.
    (4, 2, 3, 1, 2),    # 3 groups of 2.
    (16, 2, 3, 2, 8),   # Two parts of 12 rows (6 groups each), 4 rows per device.
    (12, 4, 6, 1, 0),   # 12 rows over 6 devices: groups of 4 do not need to be whole.
])
def test_rows_are_padded_by_whole_groups_to_split_over_the_sampler(rows, group_size, shards,
                                                                  parts, pad):
  from jaxscore.sampling import rollout as rollout_lib

  assert rollout_lib.row_padding(rows, group_size, shards, parts) == pad
  total = rows + pad
  assert pad % (group_size * parts) == 0 and (total // parts) % shards == 0


def _check(tmp_path, devices: int, sampler_devices: int, *extra: str) -> dict:
  import json
  import os
  import subprocess

  out = tmp_path / "_".join(map(str, (devices, sampler_devices, *extra)))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  script = pathlib.Path(__file__).with_name("off_policy_check.py")
  run = subprocess.run([sys.executable, str(script), str(out), str(sampler_devices), *extra],
                       env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
  return json.loads((out / "check.json").read_text())


@pytest.mark.slow
def test_disaggregated_sampling_runs_on_its_own_devices_and_matches_colocated(tmp_path):
  """1 + 1 fake devices give the colocated run on one device exactly (metrics and final
  parameters); the sampler's weights are copies on its own device, its episodes go to
  the training device. On 1 + 3, the step's 4 rows sample as 6 over the sampler's three
  devices (two copies of the last row added, then dropped) and give the one-device
  episodes."""
  colocated = _check(tmp_path, 1, 0)
  split = _check(tmp_path, 2, 1)
  assert split["metrics"] == colocated["metrics"]
  assert split["param_sum"] == colocated["param_sum"]
  assert split["param_devices"] == [0]
  for r in split["rollouts"]:
    assert r["devices"] == [1] and r["episode_devices"] == [1]
  # The weights each step sampled with are the trained ones, copied exactly.
  assert [r["sum"] for r in split["rollouts"]] == [r["sum"] for r in colocated["rollouts"]]
  wide = _check(tmp_path, 4, 3)
  assert wide["param_devices"] == [0]
  assert all(r["devices"] == [1, 2, 3] for r in wide["rollouts"])
  assert all(set(r["episode_devices"]) <= {1, 2, 3} for r in wide["rollouts"])
  # Steps 0 and 1 both sample with the initial weights: the same episodes as one device.
  assert [m["reward"] for m in wide["metrics"][:2]] == \
      [m["reward"] for m in colocated["metrics"][:2]]


@pytest.mark.slow
def test_disaggregated_lora_copies_the_base_to_the_sampler_once(tmp_path):
  """With LoRA on 1 + 1 devices, every rollout samples with the same copy of the frozen
  base on the sampler's device (only the adapters are copied after each update), and the
  run equals the colocated LoRA run on one device exactly."""
  colocated = _check(tmp_path, 1, 0, "lora")
  split = _check(tmp_path, 2, 1, "lora")
  assert split["metrics"] == colocated["metrics"]
  assert split["param_sum"] == colocated["param_sum"]
  assert [r["sum"] for r in split["rollouts"]] == [r["sum"] for r in colocated["rollouts"]]
  assert all(r["devices"] == [1] for r in split["rollouts"])
  bases = {tuple(r["base_ids"]) for r in split["rollouts"]}
  assert len(bases) == 1 and len(split["rollouts"]) == 4
