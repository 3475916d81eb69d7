"""Objectives are pluggable: a new one is a class plus its `register` line, trained by the
loops without touching them; config groups are exactly the objectives' fields."""

import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscore import config, objectives
from jaxscore.infra import checkpoint as checkpoint_lib
from jaxscore.loops import common, offline, online
from jaxscore.loops import train as train_lib
from jaxscore.models import logprobs
from jaxscore.models import model as model_lib
from jaxscore.objectives import rl, sft
from jaxscore.sampling import sampler as sampler_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import score as score_config  # noqa: E402

# ---------------------------------------------------------------------------
# A toy objective, written as a user would: REINFORCE with a constant baseline.


@dataclasses.dataclass(frozen=True)
class ConstantBaselineConfig:
  num_steps: int = 2
  baseline: float = 0.5


@objectives.register("reinforce_const")
class ConstantBaselineReinforce(objectives.OnlineObjective):
  """-(R - b) * log pi(sampled tokens), R the episode's total reward."""

  title = "REINFORCE (constant baseline)"
  Config = ConstantBaselineConfig
  uses_reference = False

  def make_batch(self, traj, step):
    advantage_B = traj.rewards_BxN.sum(1) - self.config.baseline
    weights_BxT = jnp.where(traj.turn_BxT > 0, advantage_B[:, None], 0.0)
    batch = {"tokens": traj.tokens_BxT, "mask": traj.mask_BxT, "weights": weights_BxT}
    return batch, {"baseline": self.config.baseline}

  def loss_fn(self, params, batch, rng, ref_params):
    logp, _ = logprobs.token_logprobs(params, batch["tokens"], batch["mask"], self.ctx.model_cfg)
    sampled = batch["weights"] != 0
    loss = -jnp.sum(batch["weights"] * logp) / jnp.maximum(jnp.sum(sampled), 1)
    return loss, {"reinforce/weighted_tokens": jnp.sum(sampled)}


def _config(objective: str, **group):
  c = score_config.get_config("cpu,runlocal")
  c.unlock()
  c.objective = objective
  # Registering the objective gave every config its group: no config file names it.
  config.override(c, {f"{objective}.{k}": v for k, v in group.items()})
  c.rollout.prompts_per_step, c.rollout.group_size = 2, 2
  c.sampler.max_new_tokens = 4
  c.checkpoint.every_steps = 1
  c.log.transcripts_every = 1
  return c


@pytest.mark.slow
def test_a_registered_toy_objective_trains_through_the_online_loop(tmp_path):
  from test_checkpoint import _tiny_setup

  assert "reinforce_const" in objectives.names()
  setup, params = _tiny_setup()
  c = _config("reinforce_const", num_steps=2, baseline=0.25)
  state, info = online.train(c, setup, params, params, tmp_path)
  assert int(state.step) == 2 and info["step"] == 2
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         state.params, params)
  assert any(jax.tree.leaves(changed))
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2]
  for r in records:
    assert r["baseline"] == 0.25 and r["reinforce/weighted_tokens"] > 0
    assert "phase" not in r and "reward/t1" in r and "reward/t2" in r
  assert (tmp_path / "transcripts.jsonl").exists()


def test_objective_names_and_config_errors():
  assert {"score", "pg", "sft", "reinforce_const"} <= set(objectives.names())
  with pytest.raises(ValueError, match="objective='nope': expected one of"):
    objectives.get("nope")
  with pytest.raises(ValueError, match="already registered"):
    objectives.register("score")(ConstantBaselineReinforce)
  cfg = model_lib.ModelConfig(vocab_size=16, num_layers=1, embed_dim=8, num_heads=2,
                              num_kv_heads=1, mlp_dim=16)
  with pytest.raises(ValueError, match="config pg.betta is not a field of PolicyGradient"):
    objectives.make("pg", {"betta": 0.1}, objectives.Context(cfg))
  with pytest.raises(ValueError, match="is offline: use loops.offline"):
    online.train(_config("sft"), None, None, None, "/tmp/unused",
                 objective=offline.make_objective(_config("sft"), cfg))


@pytest.mark.parametrize("variant", ["cpu", "gsm8k", "math", "code", "cpu,runlocal"])
def test_config_groups_are_exactly_the_dataclass_fields(variant):
  c = score_config.get_config(variant)
  groups = {name: objectives.get(name).Config for name in ("score", "pg", "grpo", "sft")}
  groups |= {"rollout": online.RolloutConfig, "sampler": sampler_lib.SamplingConfig,
             "offline": offline.OfflineConfig, "optim": train_lib.OptimConfig,
             "checkpoint": common.CheckpointConfig, "log": common.LogConfig}
  for name, cls in groups.items():
    fields = {f.name for f in dataclasses.fields(cls)}
    assert set(c[name].keys()) == fields, name
    cls(**c[name])
  assert c.objective in objectives.names()


# ---------------------------------------------------------------------------
# The offline loop and the SFT objective.

CFG = model_lib.ModelConfig(vocab_size=16, num_layers=1, embed_dim=16, num_heads=2,
                            num_kv_heads=1, mlp_dim=32)


def _examples(n: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  return [{"prompt": rng.integers(1, 16, rng.integers(2, 5)).tolist(),
           "completion": rng.integers(1, 16, rng.integers(1, 4)).tolist()} for _ in range(n)]


def test_sft_loss_is_the_completion_tokens_nll():
  params = model_lib.init(CFG, jax.random.key(0), stddev=0.3)
  examples = [{"prompt": [1, 2, 3], "completion": [4, 5]}, {"prompt": [6], "completion": [7]}]
  batch = sft.collate_completions(examples, width=6)
  loss, _ = sft.sft_loss(params, jax.tree.map(jnp.asarray, batch), None, None, cfg=CFG)
  # A second implementation: each completion token's log-prob from a full forward.
  nll = []
  for e in examples:
    seq = e["prompt"] + e["completion"]
    logits, _ = model_lib.apply(params, jnp.array([seq]), CFG)
    logp = jax.nn.log_softmax(logits[0], axis=-1)
    nll += [-float(logp[t - 1, seq[t]]) for t in range(len(e["prompt"]), len(seq))]
  np.testing.assert_allclose(loss, np.mean(nll), rtol=1e-5)
  # Prompt tokens are context only: changing what follows the prompt's first token in
  # the prompt changes the loss only through the completion's context, never as a target.
  grad = jax.grad(lambda lp: rl.aggregate(-lp, jnp.asarray(batch.target_BxT), "token_mean"))(
      jnp.zeros(batch.tokens_BxT.shape))
  np.testing.assert_array_equal(np.asarray(grad) != 0, batch.target_BxT)


def _offline_config(num_epochs=2, batch_size=4):
  c = _config("sft")
  c.offline.batch_size, c.offline.num_epochs = batch_size, num_epochs
  c.optim.learning_rate = 1e-2
  return c


def test_offline_loop_resumes_exactly_and_learns(tmp_path):
  params = model_lib.init(CFG, jax.random.key(0), stddev=0.3)
  c = _offline_config()
  obj = offline.make_objective(c, CFG)
  data, held_out = _examples(9), _examples(4, seed=1)
  straight, info = offline.train(c, CFG, obj, params, params, data, tmp_path / "a",
                                 eval_examples=held_out)
  assert info["step"] == 4  # 2 epochs x (9 // 4) steps.
  half, info = offline.train(c, CFG, obj, params, params, data, tmp_path / "b",
                             eval_examples=held_out, stop_after=3)
  assert int(half.step) == 3
  resumed, info = offline.train(c, CFG, obj, params, params, data, tmp_path / "b",
                                eval_examples=held_out)
  assert info["step"] == 4
  jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)
  jax.tree.map(np.testing.assert_array_equal, resumed.opt_state, straight.opt_state)
  read = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
  drop_time = lambda rs: [{k: v for k, v in r.items() if not k.startswith("time")} for r in rs]
  assert drop_time(read(tmp_path / "a")) == drop_time(read(tmp_path / "b"))
  records = read(tmp_path / "a")
  evals = [r["eval/loss"] for r in records if "eval/loss" in r]
  assert [r["step"] for r in records if "eval/loss" in r] == [2, 4]  # After each epoch.
  assert records[-1]["loss"] < records[0]["loss"]
  # The best checkpoint is the lowest evaluation loss.
  best, step = common.restore_params(c, tmp_path / "a", CFG, params, "best")
  assert step == 2 + 2 * int(np.argmin(evals))


def _disk_bytes(directory) -> int:
  return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def test_a_finished_run_keeps_its_latest_and_best_params_without_the_optimizer(tmp_path):
  c = _offline_config()
  params = model_lib.init(CFG, jax.random.key(0), stddev=0.3)
  optimizer = train_lib.make_optimizer(train_lib.OptimConfig(**c.optim))
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "checkpoints", keep=1, best_metric="eval/loss",
                                     best_mode="min")
  for step, loss in ((1, 0.5), (2, 0.9), (3, 0.7)):
    p = jax.tree.map(lambda x: x + step, params)
    # Moments after a real update: zeros would compress to nothing on disk.
    _, opt_state = optimizer.update(params, optimizer.init(p), p)
    state = train_lib.TrainState(step=jnp.asarray(step, jnp.int32), params=p, opt_state=opt_state)
    ckpt.save(step, state, {"step": step}, metrics={"eval/loss": loss})
  ckpt.close()
  full_bytes = _disk_bytes(tmp_path / "checkpoints")
  # Reading parameters does not depend on the optimizer's state or its config.
  c.optim.optimizer = "rmsprop"
  assert common.keep_params_only(c, tmp_path, CFG, params) == [1, 3]  # Best and latest.
  assert not (tmp_path / "checkpoints").exists()
  # No optimizer arrays are written (with Adam, two moments per parameter).
  assert _disk_bytes(tmp_path / "params") < 0.5 * full_bytes
  for step in (1, 3):
    meta = json.loads((tmp_path / "params" / str(step) / "meta" / "metadata").read_text())
    assert meta["params_only"] and meta["step"] == step
    assert all(k.startswith("['params']") for k in meta["checksums"]), meta["checksums"]
  for which, step in (("best", 1), ("latest", 3), ("3", 3)):
    got, got_step = common.restore_params(c, tmp_path, CFG, params, which)
    assert got_step == step
    jax.tree.map(lambda g, x: np.testing.assert_array_equal(g, x + step), got, params)


def test_offline_batches_follow_a_seeded_permutation_per_epoch():
  per_epoch = offline.steps_per_epoch(10, 3)
  assert per_epoch == 3
  epoch0 = np.concatenate([offline.batch_indices(10, s, 3, seed=7) for s in range(3)])
  epoch1 = np.concatenate([offline.batch_indices(10, s, 3, seed=7) for s in range(3, 6)])
  assert len(set(epoch0)) == 9 and len(set(epoch1)) == 9
  assert not np.array_equal(epoch0, epoch1)
  np.testing.assert_array_equal(offline.batch_indices(10, 4, 3, seed=7), epoch1[3:6])
  with pytest.raises(ValueError, match="fewer than one batch"):
    offline.steps_per_epoch(2, 3)


def test_linear_schedule_with_warmup_and_rmsprop():
  c = train_lib.OptimConfig(optimizer="rmsprop", learning_rate=1e-3, schedule="linear",
                            warmup_steps=2, total_steps=10, b2=0.9, max_grad_norm=0.0)
  lr = train_lib.learning_rate_schedule(c)
  np.testing.assert_allclose([float(lr(s)) for s in (0, 1, 2, 6, 10)],
                             [0.0, 5e-4, 1e-3, 5e-4, 0.0], atol=1e-9)
  # RMSprop's first step from zero state: lr * g / (sqrt((1 - decay) * g^2) + eps).
  opt = train_lib.make_optimizer(c.__class__(**{**c.__dict__, "warmup_steps": 0,
                                                "schedule": "constant"}))
  g = {"w": jnp.array([0.5, -2.0])}
  updates, _ = opt.update(g, opt.init(g))
  expected = -1e-3 * g["w"] / (jnp.sqrt(0.1 * g["w"] ** 2) + 1e-8)
  np.testing.assert_allclose(updates["w"], expected, rtol=1e-5)
