"""Checkpoints: exact resume, latest-K plus best, kill -9 mid-save, SIGTERM."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import require_embedded

from jaxscore import evaluate
from jaxscore.infra import checkpoint as checkpoint_lib
from jaxscore.loops import train as train_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_keeps_latest_and_best(tmp_path):
  ckpt = checkpoint_lib.Checkpointer(tmp_path, keep=1)
  for step, reward in ((1, 5.0), (2, 1.0), (3, 2.0), (4, 0.5)):
    ckpt.save(step, {"w": jnp.full((3,), float(step))}, {"step": step}, {"reward": reward})
  ckpt.wait()
  assert sorted(ckpt.manager.all_steps()) == [1, 4]
  assert ckpt.best_step() == 1
  state, meta = ckpt.restore({"w": jax.ShapeDtypeStruct((3,), jnp.float32)}, step=1)
  np.testing.assert_array_equal(state["w"], 1.0)
  assert meta == {"step": 1, "metrics": {"reward": 5.0}, "best_metric": "reward",
                  "best_mode": "max",
                  "checksums": {"['w']": int(checkpoint_lib.checksums(state)["w"])}}
  ckpt.close()


def _tree(value: float):
  return {"w": jnp.full((3, 5), value), "b": jnp.arange(4, dtype=jnp.bfloat16) + value}


_ABSTRACT = {"w": jax.ShapeDtypeStruct((3, 5), jnp.float32),
             "b": jax.ShapeDtypeStruct((4,), jnp.bfloat16)}


def _rewrite_meta(directory, step, change):
  path = directory / str(step) / "meta" / "metadata"
  meta = json.loads(path.read_text())
  change(meta)
  path.write_text(json.dumps(meta))


def test_a_checkpoint_that_fails_its_checksums_is_reported_and_skipped(tmp_path, capsys):
  ckpt = checkpoint_lib.Checkpointer(tmp_path, keep=3, best_metric=None)
  for step in (1, 2, 3):
    ckpt.save(step, _tree(float(step)), {"step": step})
  ckpt.wait()
  ckpt.close()
  # Step 3's data no longer matches what was saved (as if bits flipped on disk).
  _rewrite_meta(tmp_path, 3, lambda m: m["checksums"].update({"['w']": 12345}))
  ckpt = checkpoint_lib.Checkpointer(tmp_path, keep=3, best_metric=None)
  state, meta = ckpt.restore(_ABSTRACT)
  assert meta["step"] == 2
  np.testing.assert_array_equal(state["w"], 2.0)
  assert "checkpoint step 3" in capsys.readouterr().out
  # Kept aside for inspection, out of orbax's sight: the run can save step 3 again.
  assert (tmp_path / "3.corrupt").is_dir() and sorted(ckpt.manager.all_steps()) == [1, 2]
  ckpt.close()
  _rewrite_meta(tmp_path, 2, lambda m: m["checksums"].update({"['b']": 1}))
  ckpt = checkpoint_lib.Checkpointer(tmp_path, keep=3, best_metric=None)
  with pytest.raises(checkpoint_lib.CorruptCheckpoint, match=r"step 2 .*corrupt.*\['b'\]"):
    ckpt.restore(_ABSTRACT, step=2)  # A step asked for by number is never replaced.
  ckpt.close()


def test_parameters_alone_are_restored_and_verified_against_their_checksums(tmp_path):
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((3,), jnp.bfloat16)}
  state = train_lib.TrainState.create(params, optax.adam(1e-3))
  ckpt = checkpoint_lib.Checkpointer(tmp_path, keep=2, best_metric=None)
  for step in (1, 2):
    ckpt.save(step, state, {"step": step})
  ckpt.close()
  abstract = {"params": checkpoint_lib.abstract_like(params)}
  reader = checkpoint_lib.Checkpointer(tmp_path, keep=2, best_metric=None)
  got, meta = reader.restore(abstract, partial=True)
  assert meta["step"] == 2 and set(got) == {"params"}
  jax.tree.map(np.testing.assert_array_equal, got["params"], params)
  reader.close()
  # Only the restored arrays are checked: a bad optimizer checksum does not matter here,
  # a bad parameter checksum does.
  _rewrite_meta(tmp_path, 2, lambda m: m["checksums"].update({".opt_state[0].mu['w']": 1}))
  _rewrite_meta(tmp_path, 1, lambda m: m["checksums"].update({".params['w']": 1}))
  reader = checkpoint_lib.Checkpointer(tmp_path, keep=2, best_metric=None)
  got, _ = reader.restore(abstract, step=2, partial=True)
  jax.tree.map(np.testing.assert_array_equal, got["params"], params)
  with pytest.raises(checkpoint_lib.CorruptCheckpoint, match=r"step 1 .*\.params\['w'\]"):
    reader.restore(abstract, step=1, partial=True)
  reader.close()


def test_a_truncated_metadata_file_is_named_and_skipped(tmp_path, capsys):
  ckpt = checkpoint_lib.Checkpointer(tmp_path, keep=3, best_metric=None)
  for step in (1, 2):
    ckpt.save(step, _tree(float(step)), {"step": step})
  ckpt.close()
  metadata = tmp_path / "2" / "state" / "_METADATA"
  metadata.write_bytes(metadata.read_bytes()[:40])
  ckpt = checkpoint_lib.Checkpointer(tmp_path, keep=3, best_metric=None)
  state, meta = ckpt.restore(_ABSTRACT)
  assert meta["step"] == 1
  out = capsys.readouterr().out
  assert f"checkpoint step 2 in {tmp_path} cannot be read" in out
  ckpt.close()


def test_checksums_see_single_bit_flips_and_not_sharding():
  x = jnp.linspace(-1, 1, 64, dtype=jnp.float32).reshape(8, 8)
  flipped = np.array(x)
  flipped.view(np.uint32)[5, 3] ^= 1 << 7
  assert int(checkpoint_lib.checksums(x)) != int(checkpoint_lib.checksums(jnp.asarray(flipped)))
  assert int(checkpoint_lib.checksums(x)) == int(checkpoint_lib.checksums(x.T.T + 0.0))


def test_non_finite_state_is_never_saved(tmp_path):
  ckpt = checkpoint_lib.Checkpointer(tmp_path, keep=2, best_metric=None)
  ckpt.save(1, _tree(1.0), {"step": 1})
  with pytest.raises(FloatingPointError, match="step 2: the state has non-finite values"):
    ckpt.save(2, {"w": jnp.full((3, 5), jnp.nan), "b": jnp.zeros((4,), jnp.bfloat16)},
              {"step": 2})
  ckpt.wait()
  assert sorted(ckpt.manager.all_steps()) == [1]
  ckpt.close()


def test_the_checkpoint_last_restored_is_never_deleted(tmp_path):
  ckpt = checkpoint_lib.Checkpointer(tmp_path, keep=1, best_metric=None)
  ckpt.save(1, _tree(1.0), {"step": 1})
  ckpt.save(2, _tree(2.0), {"step": 2})
  ckpt.wait()
  assert sorted(ckpt.manager.all_steps()) == [2]
  ckpt.close()
  ckpt = checkpoint_lib.Checkpointer(tmp_path, keep=1, best_metric=None)
  assert ckpt.restore(_ABSTRACT)[1]["step"] == 2
  for step in (3, 4, 5):
    ckpt.save(step, _tree(float(step)), {"step": step})
  ckpt.wait()
  assert sorted(ckpt.manager.all_steps()) == [2, 5]
  ckpt.close()


_OFFLINE_RUN = textwrap.dedent("""
    import pickle, sys
    sys.path[:0] = [sys.argv[2], sys.argv[2] + "/tests"]
    import jax, numpy as np
    from test_objectives import CFG, _examples, _offline_config
    from jaxscore.loops import offline
    from jaxscore.models import model as model_lib
    params = model_lib.init(CFG, jax.random.key(0), stddev=0.3)
    c = _offline_config(num_epochs=2, batch_size=4)
    stop = int(sys.argv[3]) if len(sys.argv) > 3 else None
    state, info = offline.train(c, CFG, offline.make_objective(c, CFG), params, params,
                                _examples(9), sys.argv[1], stop_after=stop)
    np.save(sys.argv[1] + ".npy", np.concatenate(
        [np.ravel(np.asarray(x)) for x in jax.tree.leaves(state.params)]))
    print("STEP", info["step"])
""")


def _offline_run(workdir, *args):
  out = subprocess.run([sys.executable, "-c", _OFFLINE_RUN, str(workdir), str(ROOT), *args],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_flipped_bytes_in_the_latest_checkpoint_resume_from_the_previous_one(tmp_path):
  """The offline loop on a tiny model, each run a new process (as after a preemption):
  corrupt the latest checkpoint's data files, and the rerun reports it, resumes from
  the one before, and ends exactly where an uninterrupted run ends."""
  _offline_run(tmp_path / "a")
  _offline_run(tmp_path / "b", "3")
  data = tmp_path / "b" / "checkpoints" / "3" / "state"
  for blob in (p for p in data.rglob("*") if p.is_file() and p.parent.name == "d"):
    raw = bytearray(blob.read_bytes())
    for i in range(len(raw) // 4, len(raw)):
      raw[i] ^= 0x5A
    blob.write_bytes(bytes(raw))
  out = _offline_run(tmp_path / "b")
  assert "checkpoint step 3" in out and "resumed from step 2" in out and "STEP 4" in out
  np.testing.assert_array_equal(np.load(str(tmp_path / "b") + ".npy"),
                                np.load(str(tmp_path / "a") + ".npy"))


_KILL_MID_SAVE = textwrap.dedent("""
    import sys, threading, jax.numpy as jnp
    import orbax.checkpoint as ocp
    from jaxscore.infra import checkpoint
    # Step 3's data is fully written but not yet committed (renamed into place) when
    # the parent kills this process: the worst moment, reached without any timing.
    atomic = ocp.path.atomicity.AtomicRenameTemporaryPath
    commit = atomic.finalize
    async def hang_before_step_3(self):
      if self._final_path.name == "3":
        print("SAVING", flush=True)
        threading.Event().wait()
      return await commit(self)
    atomic.finalize = hang_before_step_3
    ckpt = checkpoint.Checkpointer(sys.argv[1], keep=3, best_metric=None)
    for step in (1, 2, 3):
      ckpt.save(step, {"w": jnp.full((8,), float(step)), "big": jnp.zeros((4,))}, {"step": step})
      ckpt.wait()
""")


def test_kill_9_during_a_save_leaves_previous_checkpoint_restorable(tmp_path):
  proc = subprocess.Popen([sys.executable, "-c", _KILL_MID_SAVE, str(tmp_path)],
                          stdout=subprocess.PIPE, text=True, cwd=ROOT)
  assert proc.stdout.readline().strip() == "SAVING"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  in_progress = lambda: [p.name for p in tmp_path.iterdir() if "tmp" in p.name]
  assert in_progress(), "step 3 was mid-save"
  abstract = {"w": jax.ShapeDtypeStruct((8,), jnp.float32),
              "big": jax.ShapeDtypeStruct((4,), jnp.float32)}
  # A reader (evaluation, export) cannot tell a dead save from a live writer's: it
  # leaves temporary directories alone.
  reader = checkpoint_lib.Checkpointer(tmp_path, keep=3, best_metric=None, read_only=True)
  assert reader.latest_step() == 2, "the interrupted save must not be visible"
  np.testing.assert_array_equal(reader.restore(abstract)[0]["w"], 2.0)
  reader.close()
  assert in_progress()
  # The writer that resumes the run removes them, before close() returns.
  ckpt = checkpoint_lib.Checkpointer(tmp_path, keep=3, best_metric=None)
  assert ckpt.latest_step() == 2, "the interrupted save must not be visible"
  state, meta = ckpt.restore(abstract)
  np.testing.assert_array_equal(state["w"], 2.0)
  assert meta["step"] == 2
  ckpt.close()
  assert not in_progress()


# ---------------------------------------------------------------------------
# The full loop on a tiny random model with the embedded tokenizer.


def _tiny_setup():
  """(setup, params): a tiny random model with the embedded tokenizer, on add1."""
  from jaxscore import tasks
  from jaxscore.models import model as model_lib
  from jaxscore.models import tokenizer as tokenizer_lib
  from jaxscore.sampling import formats, rollout

  tok = tokenizer_lib.load_tokenizer(require_embedded())
  cfg = model_lib.ModelConfig(vocab_size=len(tok), num_layers=1, embed_dim=16, num_heads=2,
                              num_kv_heads=1, mlp_dim=32, tie_embeddings=True)
  params = model_lib.init(cfg, jax.random.key(0), stddev=0.5)
  task = tasks.make_task("arithmetic", level="add1")
  return rollout.Setup(cfg, tok, formats.ChatFormat(tok), task), params


def _config(pad_multiple=None):
  import sys as _sys

  _sys.path.insert(0, str(ROOT))
  from configs import score

  c = score.get_config("cpu,runlocal")
  c.score.stages = "I:2,II:2"
  c.rollout.prompts_per_step, c.rollout.group_size = 2, 2
  c.sampler.max_new_tokens = 4
  c.checkpoint.every_steps = 1
  c.log.transcripts_every = 1
  if pad_multiple is not None:
    c.rollout.pad_multiple = pad_multiple
  return c


def _metrics(workdir):
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in lines]


@pytest.mark.slow
def test_resume_continues_exactly_where_training_stopped(tmp_path):
  from jaxscore.loops import online

  setup, params = _tiny_setup()
  c = _config()
  straight, _ = online.train(c, setup, params, params, tmp_path / "a")
  half, info = online.train(c, setup, params, params, tmp_path / "b", stop_after=2)
  assert info["step"] == 2 and int(half.step) == 2
  resumed, info = online.train(c, setup, params, params, tmp_path / "b")
  assert info["step"] == 4
  jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)
  jax.tree.map(np.testing.assert_array_equal, resumed.opt_state, straight.opt_state)
  assert _metrics(tmp_path / "b") == _metrics(tmp_path / "a")
  assert len(_metrics(tmp_path / "a")) == 4
  transcripts = (tmp_path / "a" / "transcripts.jsonl").read_text().splitlines()
  assert len(transcripts) == 4 * 4 and "attempts" in json.loads(transcripts[0])


@pytest.mark.slow
def test_a_token_budget_ends_the_run_at_the_same_step_when_resumed(tmp_path):
  """The run stops after the step whose rollout brings the sampled tokens to the budget;
  a run stopped before then resumes with the tokens it had spent and stops there too."""
  from jaxscore.loops import online

  setup, params = _tiny_setup()
  c = _config()
  online.train(c, setup, params, params, tmp_path / "a", stop_after=3)
  tokens = [m["budget/tokens"] for m in _metrics(tmp_path / "a")]
  budget = tokens[0] + tokens[1]  # Reached exactly at step 2 of 4.
  _, info = online.train(c, setup, params, params, tmp_path / "b", stop_after=1,
                         token_budget=budget)
  assert info["step"] == 1 and info["spent"] == tokens[0]
  _, info = online.train(c, setup, params, params, tmp_path / "b", token_budget=budget)
  assert info["step"] == 2 and info["spent"] == budget
  assert _metrics(tmp_path / "b") == _metrics(tmp_path / "a")[:2]
  # Nothing left to spend: a rerun takes no step.
  _, info = online.train(c, setup, params, params, tmp_path / "b", token_budget=budget)
  assert info["step"] == 2 and len(_metrics(tmp_path / "b")) == 2


_SIGTERM = textwrap.dedent("""
    import sys
    sys.path[:0] = [sys.argv[2], sys.argv[2] + "/tests"]
    import test_checkpoint as t
    from jaxscore.loops import online
    setup, params = t._tiny_setup()
    c = t._config()
    c.score.stages = "I:50,II:50"
    c.checkpoint.every_steps = 1000
    state, info = online.train(c, setup, params, params, sys.argv[1])
    print("EXIT", info, flush=True)
""")


@pytest.mark.slow
def test_sigterm_saves_before_exit(tmp_path):
  require_embedded()
  proc = subprocess.Popen([sys.executable, "-c", _SIGTERM, str(tmp_path), str(ROOT)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert time.time() < deadline and proc.poll() is None
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0 and "'preempted': True" in out
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] >= 2  # Saved although every_steps is 1000.


_MESH_RUN = textwrap.dedent("""
    import json, sys
    sys.path[:0] = [sys.argv[2], sys.argv[2] + "/tests"]
    import jax
    import test_checkpoint as t
    from jaxscore.loops import online
    assert jax.device_count() == 4
    setup, params = t._tiny_setup()
    c = t._config()
    c.score.stages = "I:1,II:1"
    c.mesh.data = 4
    state, info = online.train(c, setup, params, params, sys.argv[1])
    print("SHARDS", len(jax.tree.leaves(state.params)[0].sharding.device_set))
""")


@pytest.mark.slow
def test_training_loop_on_4_devices_matches_one_device(tmp_path):
  from jaxscore.loops import online

  setup, params = _tiny_setup()
  c = _config()
  c.score.stages = "I:1,II:1"
  online.train(c, setup, params, params, tmp_path / "one")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _MESH_RUN, str(tmp_path / "four"), str(ROOT)],
                       env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "SHARDS 4" in out.stdout
  one, four = _metrics(tmp_path / "one"), _metrics(tmp_path / "four")
  assert len(one) == len(four) == 2
  for a, b in zip(one, four):
    assert a.keys() == b.keys()
    for k in a:
      if isinstance(a[k], float):
        # No sample of this tiny random model is rewarded and the policy starts at the
        # reference: the gradients are zero in exact arithmetic (step 1) or the KL's
        # answer to step 1's rounding (step 2), norms of 1e-7 to 1e-5 that sums taken
        # in another order change by as much as themselves.
        noise = 1e-4 if k == "grad_norm" else 1e-5
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=noise), (k, a, b)
      else:
        assert a[k] == b[k], k


_NO_RECOMPILE = textwrap.dedent("""
    import collections, concurrent.futures, json, logging, pathlib, re, sys
    sys.path[:0] = [sys.argv[2], sys.argv[2] + "/tests"]
    import jax
    import test_checkpoint as t
    from jaxscore.infra import sharding
    from jaxscore.loops import online
    assert jax.device_count() == 4
    jax.config.update("jax_log_compiles", True)
    compiles = collections.Counter()

    class CountCompiles(logging.Handler):
      def emit(self, record):
        if m := re.match(r"Compiling jit\\((\\w+)\\)", record.getMessage()):
          compiles[m.group(1)] += 1

    logging.getLogger("jax").addHandler(CountCompiles())
    setup, params = t._tiny_setup()
    c = t._config(pad_multiple=0)
    c.score.stages = "I:2,II:2"
    mesh, rules = sharding.make_mesh(2, 2, 1), sharding.RULES["fsdp"]
    names = ("train_step", "token_logprobs", "_init_impl", "_prefill_impl",
             "_decode_impl", "_append_impl", "_live_impl", "_finish_impl")
    steps = []
    with sharding.activate(mesh, rules), concurrent.futures.ThreadPoolExecutor(2) as pool:
      loop = online.OnlineLoop(c, setup, online.make_objective(c, setup),
                                pathlib.Path(sys.argv[1]), mesh, rules)
      state, ref_params = loop.run.initial_state(params, params)
      for _ in range(4):
        state, m, _ = loop.step(state, ref_params, pool)
        steps.append({"stage": m["phase"], **{n: compiles[n] for n in names}})
      loop.run.ckpt.close()
    windows = len({loop.sampler.window(n) for n in range(1, loop.sampler.max_len + 1)})
    print("WINDOWS", windows)
    print("COMPILES", json.dumps(steps))
""")


@pytest.mark.slow
def test_sharded_steps_compile_once_for_the_whole_run(tmp_path):
  """With pad_multiple=0 every step has one shape and every output keeps its input's
  sharding, so after the first step nothing compiles again (counted from JAX's compile
  log), across the stage I -> II switch, on an FSDP mesh. Decode compiles once per
  cache-length window its episodes reach (at most one per window size), everything
  else once. (Its 4-row batches are too small to compact.)"""
  require_embedded()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _NO_RECOMPILE, str(tmp_path), str(ROOT)],
                       env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  line = next(l for l in out.stdout.splitlines() if l.startswith("COMPILES"))
  steps = json.loads(line.split(" ", 1)[1])
  assert [s.pop("stage") for s in steps] == ["I", "I", "II", "II"]
  assert steps[0]["train_step"] == steps[0]["token_logprobs"] == 1, steps[0]
  windows = int(next(l for l in out.stdout.splitlines() if l.startswith("WINDOWS")).split()[1])
  assert 1 <= steps[0]["_decode_impl"] <= windows, (steps[0], windows)
  assert all(n == 1 for k, n in steps[0].items() if k != "_decode_impl"), steps[0]
  assert all(s == steps[0] for s in steps), steps


class _ParityTask:
  """add1's problems; a reply earns 1 when its length is even, so training rewards vary
  from step to step even on a random model."""

  def __init__(self, task):
    self.task, self.name, self.instruction = task, "parity", task.instruction

  def problems(self, split):
    return self.task.problems(split)

  def score(self, problems, responses):
    from jaxscore.tasks import base

    return [base.Score(float(len(r) % 2 == 0), None, base.CORRECT) for r in responses]


@pytest.mark.slow
def test_the_best_checkpoint_holds_the_parameters_that_earned_its_reward(tmp_path):
  """Each RL checkpoint's reward label is the reward of a rollout sampled by the very
  parameters it holds: restored and rolled out again with that step's problems and key,
  they earn exactly the label. (The label used to be the previous parameters' reward.)"""
  import dataclasses

  from jaxscore.loops import online
  from jaxscore.sampling import rollout as rollout_lib

  setup, params = _tiny_setup()
  setup = dataclasses.replace(setup, task=_ParityTask(setup.task))
  c = _config()
  c.sampler.max_new_tokens = 6
  c.checkpoint.keep = 10
  online.train(c, setup, params, params, tmp_path)
  rewards = {r["step"]: r["reward"] for r in _metrics(tmp_path)}
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "checkpoints", keep=10, read_only=True)
  labelled = {}
  for step in ckpt.manager.all_steps():
    meta = ckpt.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    if meta["meta"]["metrics"]:
      labelled[step] = meta["meta"]["metrics"]["reward"]
  # Steps 1..3 were saved after their rollouts; step 4, the last update, has none.
  assert sorted(labelled) == [1, 2, 3] and 4 in ckpt.manager.all_steps()
  # Metrics are logged under the number of updates done: step s's rollout is row s + 1.
  assert labelled == {s: rewards[s + 1] for s in labelled}
  assert len(set(rewards.values())) > 1, rewards  # The labels can tell steps apart.
  from jaxscore.infra import sharding
  from jaxscore.loops import common

  mesh, rules = common.mesh_from_config(c)
  with sharding.activate(mesh, rules):
    loop = online.OnlineLoop(c, setup, online.make_objective(c, setup), tmp_path / "re",
                             mesh, rules)
  abstract = {"params": checkpoint_lib.abstract_like(params)}
  for step, label in labelled.items():
    restored, _ = ckpt.restore(abstract, step=step, partial=True)
    rows = [p for p in online.batch_problems(loop.problems, step, c.rollout.prompts_per_step,
                                             c.seed) for _ in range(c.rollout.group_size)]
    ro = rollout_lib.rollout(restored["params"], loop.sampler, setup, rows,
                             c.rollout.num_turns, loop.sampling,
                             jax.random.fold_in(jax.random.key(c.seed), step),
                             group_size=c.rollout.group_size)
    assert float(ro.rewards_BxN.sum(1).mean()) == label, step
  ckpt.close()
  loop.run.ckpt.close()
  best = checkpoint_lib.Checkpointer(tmp_path / "checkpoints", keep=10, read_only=True)
  assert best.best_step() == max(labelled, key=lambda s: (labelled[s], s))
  best.close()


def test_weights_and_biases_logs_one_run_per_workdir_offline(tmp_path, monkeypatch):
  """log.wandb_project in W&B's offline mode (files under the workdir, no network): the
  scalars and the config reach the run's file, a resumed run continues the same W&B
  run (its id kept in the workdir), and the evaluation table joins it."""
  pytest.importorskip("wandb")
  from jaxscore.infra import wandb_log
  from jaxscore.loops import online

  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  setup, params = _tiny_setup()
  c = _config()
  c.score.stages = "I:1,II:1"
  c.log.wandb_project = "jaxscore-test"
  online.train(c, setup, params, params, tmp_path, stop_after=1)
  online.train(c, setup, params, params, tmp_path)
  run_id = (tmp_path / "wandb_run_id").read_text()
  runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
  assert len(runs) == 2 and all(r.name.endswith("-" + run_id) for r in runs), runs
  wandb_log.log_evaluation(c, tmp_path, {"before": {"acc@t1": 0.25, "acc@t2": 0.5,
                                                    "delta(t1,t2)": 0.25, "delta_i->c": 0.25,
                                                    "delta_c->i": 0.0}},
                          evaluate.table_keys(2))
  first, second, third = sorted((tmp_path / "wandb").glob("offline-run-*"))
  for run in (first, second):
    data = next(run.glob("run-*.wandb")).read_bytes()
    assert b"reward/t1" in data and b"kl/t1" in data  # Scalars of the loop.
  assert b"objective" in next(first.glob("run-*.wandb")).read_bytes()  # The config.
  assert third.name.endswith("-" + run_id)
  table = json.loads(next(third.glob("files/media/table/evaluation_*.table.json")).read_text())
  assert table["columns"] == ["model", "acc@t1", "acc@t2", "delta(t1,t2)", "delta_i->c",
                              "delta_c->i"]
  assert table["data"] == [["before", 25.0, 50.0, 25.0, 25.0, 0.0]]
