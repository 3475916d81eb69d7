"""Self-Explore: the masked DPO loss, step splitting, first pits and step pairs, partial
replies, and the pipeline end to end."""

import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_embedded, shared_data

from jaxscore.models import model as model_lib
from jaxscore.objectives import dpo
from jaxscore.self_explore import explore, steps
from jaxscore.tasks import make_task
from jaxscore.tasks.base import Problem

ROOT = pathlib.Path(__file__).resolve().parents[1]
CFG = model_lib.ModelConfig(vocab_size=16, num_layers=1, embed_dim=16, num_heads=2,
                            num_kv_heads=1, mlp_dim=32)
PAIRS = [{"prompt": [1, 2, 3], "chosen": [4, 5], "rejected": [6]},
         {"prompt": [7], "chosen": [8], "rejected": [9, 10, 11]}]


# ---------------------------------------------------------------------------
# The DPO loss.


def _seq_logp(params, prompt, completion):
  """A second implementation: completion log-prob from one full forward, by hand."""
  seq = prompt + completion
  logits, _ = model_lib.apply(params, jnp.array([seq]), CFG)
  logp = jax.nn.log_softmax(logits[0], axis=-1)
  return sum(float(logp[t - 1, seq[t]]) for t in range(len(prompt), len(seq)))


def test_dpo_loss_is_log2_when_policy_is_the_reference():
  params = model_lib.init(CFG, jax.random.key(0), stddev=0.3)
  examples = dpo.reference_logprobs(PAIRS, params, CFG, width=6, batch_size=2)
  for e in examples:
    assert e["ref_chosen"] == pytest.approx(_seq_logp(params, e["prompt"], e["chosen"]), abs=1e-5)
    assert e["ref_rejected"] == pytest.approx(_seq_logp(params, e["prompt"], e["rejected"]),
                                              abs=1e-5)
  batch = jax.tree.map(jnp.asarray, dpo.collate_pairs(examples, 6))
  loss, m = dpo.dpo_loss(params, batch, None, None, cfg=CFG, beta=0.1)
  np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)
  assert float(m["dpo/margin"]) == pytest.approx(0.0, abs=1e-6)


def test_dpo_loss_golden_and_prompt_tokens_get_no_gradient():
  params = model_lib.init(CFG, jax.random.key(0), stddev=0.3)
  ref = model_lib.init(CFG, jax.random.key(1), stddev=0.3)
  examples = dpo.reference_logprobs(PAIRS, ref, CFG, width=6, batch_size=2)
  batch = jax.tree.map(jnp.asarray, dpo.collate_pairs(examples, 6))
  loss, _ = dpo.dpo_loss(params, batch, None, None, cfg=CFG, beta=0.5)
  expected = []
  for e in PAIRS:
    margin = ((_seq_logp(params, e["prompt"], e["chosen"])
               - _seq_logp(ref, e["prompt"], e["chosen"]))
              - (_seq_logp(params, e["prompt"], e["rejected"])
                 - _seq_logp(ref, e["prompt"], e["rejected"])))
    expected.append(-math.log(1 / (1 + math.exp(-0.5 * margin))))
  np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-5)
  # The loss as a function of per-token log-probs: only completion tokens matter.
  b = dpo.collate_pairs(examples, 6)

  def from_token_logp(logp_2BxT):
    target = jnp.asarray(b.target_2BxT) & jnp.asarray(b.mask_2BxT)
    seq = jnp.sum(jnp.where(target, logp_2BxT, 0.0), axis=1)
    return jnp.mean(jax.vmap(lambda c, r, rc, rr: -jax.nn.log_sigmoid(0.5 * ((c - rc) - (r - rr))))(
        seq[:2], seq[2:], jnp.asarray(b.ref_logp_2B[:2]), jnp.asarray(b.ref_logp_2B[2:])))

  grad = jax.grad(from_token_logp)(jnp.full(b.tokens_2BxT.shape, -1.0))
  np.testing.assert_array_equal(np.asarray(grad) != 0, b.target_2BxT & b.mask_2BxT)
  prompt_slots = np.zeros_like(b.target_2BxT)
  for row, e in enumerate(PAIRS * 2):
    prompt_slots[row, :len(e["prompt"])] = True
  assert not np.any(np.asarray(grad)[prompt_slots])


# ---------------------------------------------------------------------------
# Steps.


def test_gsm8k_solutions_split_into_lines():
  path = shared_data("gsm8k", "train.jsonl")
  rows = [json.loads(l) for l in path.read_text().splitlines()[:200]]
  for r in rows:
    parts = steps.split_lines(r["answer"])
    assert parts and all(p.endswith("\n") and p.strip() for p in parts)
    assert [p.strip() for p in parts] == [l.strip() for l in r["answer"].split("\n") if l.strip()]
    assert parts[-1].startswith("####")


def test_math500_solutions_split_into_sentences():
  path = shared_data("math500", "test.jsonl")
  for r in (json.loads(l) for l in path.read_text().splitlines()):
    parts = steps.split_sentences(r["solution"])
    assert "".join(parts) == r["solution"].strip()  # Nothing lost, nothing reordered.
    assert 1 <= len(parts) <= 10 and all(p.strip() for p in parts)


def test_final_answer_is_its_own_step():
  text = ("First we add the two numbers to get the total of 12 apples. "
          "Then we subtract the three eaten apples, leaving 9. The answer is 9.")
  parts = steps.split_sentences(text)
  assert parts[-1] == "The answer is 9."
  assert "".join(parts) == text


# ---------------------------------------------------------------------------
# Exploration and pairs, with a scripted explorer.

TASK = make_task("arithmetic", level="word")
PROBLEM = Problem(id="p0", question="q", prompt="q", answer="57")
WRONG = "7 × 9 = 63\n63 - 5 = 58\n63 - 6 = 57\nThe answer is 58.\n"
RIGHT = "7 × 9 = 63\n63 - 6 = 57\nThe answer is 57."


def scripted(good_until: int):
  """Continuations reach 57 while the prefix has at most `good_until` steps; each
  query's k completions differ in length so 'shortest' is well defined."""

  def continue_fn(queries, k):
    out = []
    for _, prefix in queries:
      t = prefix.count("\n")
      ok = t <= good_until
      out.append([("x" * i) + ("The answer is 57." if ok and i % 2 else "The answer is 1.")
                  for i in range(k)])
    return out

  return continue_fn


def test_first_pit_and_step_pair_from_a_scripted_explorer():
  runs = explore.explore([(PROBLEM, RIGHT, WRONG)], scripted(good_until=1), TASK, k=4)
  (run,) = runs
  assert run.steps == ["7 × 9 = 63\n", "63 - 5 = 58\n", "63 - 6 = 57\n", "The answer is 58.\n"]
  assert run.pit == 2 and len(run.completions) == 2  # Exploring stopped at the pit.
  assert run.correct[0] == [False, True, False, True] and not any(run.correct[1])
  (pair,) = explore.step_pairs(runs)
  assert pair == {"id": "p0", "pit": 2, "prefix": "7 × 9 = 63\n",
                  "chosen": "xThe answer is 57.", "rejected": "63 - 5 = 58\n"}


def test_pit_at_step_one_pairs_with_the_correct_rationale_and_no_pit_gives_no_pair():
  runs = explore.explore([(PROBLEM, RIGHT, WRONG)], scripted(good_until=0), TASK, k=2)
  assert runs[0].pit == 1
  assert explore.step_pairs(runs) == [{"id": "p0", "pit": 1, "prefix": "", "chosen": RIGHT,
                                       "rejected": "7 × 9 = 63\n"}]
  runs = explore.explore([(PROBLEM, RIGHT, WRONG)], scripted(good_until=9), TASK, k=2)
  assert runs[0].pit is None and len(runs[0].completions) == 4
  assert explore.step_pairs(runs) == []
  stats = explore.pit_statistics(runs, [])
  assert stats["explored"] == 1 and stats["without_pit"] == 1


def test_step_pairs_are_deduplicated_per_problem():
  runs = explore.explore([(PROBLEM, RIGHT, WRONG)] * 2, scripted(good_until=1), TASK, k=4)
  pairs = explore.step_pairs(runs)
  assert len(pairs) == 1  # The same rejected step twice for one problem: kept once.


def test_rft_set_and_outcome_pairs():
  correct = ["7 × 9 = 63\n63 - 6 = 57\nThe answer is 57.",
             "7 × 9 = 63\n63 - 6 = 57\nSo it is 57. The answer is 57.",  # Same equations.
             "9 × 7 = 63\n63 - 6 = 57\nThe answer is 57."]
  assert explore.rft_set(correct) == [correct[0], correct[2]]
  assert explore.rft_set(correct, max_per_problem=1) == [correct[0]]
  wrong = ["The answer is 58.", "7 × 9 = 63\n63 - 6 = 58\nThe answer is 58."]
  pairs = explore.outcome_pairs(explore.rft_set(correct), wrong)
  # The farthest wrong rationale first, each used once.
  assert pairs == [(correct[0], wrong[0]), (correct[2], wrong[1])]


# ---------------------------------------------------------------------------
# Partial replies.


@pytest.mark.parametrize("kind", ["chat", "plain"])
def test_continuing_a_partial_reply_tokenizes_like_the_full_reply(kind):
  from jaxscore.models import tokenizer as tokenizer_lib
  from jaxscore.sampling import formats

  tok = tokenizer_lib.load_tokenizer(require_embedded())
  fmt = formats.make_format(tok, kind)
  reply = "7 × 9 = 63\n63 - 6 = 57\nThe answer is 57."
  full = fmt.prompt_ids("What is it?") + fmt.attempt_ids(reply)
  parts = steps.split_lines(reply)
  for t in range(1, len(parts)):
    prefix = fmt.continuation_ids("What is it?", "".join(parts[:t]))
    assert full[:len(prefix)] == prefix, t
  if kind == "chat":  # And the template's own rendering of the whole exchange agrees.
    rendered = fmt.render("What is it?", [reply], [])
    assert tok.encode(rendered, add_special_tokens=False)[:len(full)] == full


# ---------------------------------------------------------------------------
# The preference step on 8 fake devices, and the pipeline.

_PREFERENCE_8 = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import jax, jax.numpy as jnp, numpy as np, optax
    from numerics import assert_close, assert_trees_close
    from jaxscore.infra import sharding
    from jaxscore.loops import train as train_lib
    from jaxscore.models import model as model_lib
    from jaxscore.objectives import dpo
    assert jax.device_count() == 8
    cfg = model_lib.ModelConfig(vocab_size=16, num_layers=2, embed_dim=16, num_heads=2,
                                num_kv_heads=1, mlp_dim=32)
    params = model_lib.init(cfg, jax.random.key(0), stddev=0.3)
    rng = np.random.default_rng(0)
    pairs = [{"prompt": rng.integers(1, 16, 3).tolist(), "chosen": rng.integers(1, 16, 2).tolist(),
              "rejected": rng.integers(1, 16, 3).tolist()} for _ in range(8)]
    ref = model_lib.init(cfg, jax.random.key(1), stddev=0.3)
    batch = dpo.collate_pairs(dpo.reference_logprobs(pairs, ref, cfg, 8, 8), 8)
    loss_fn = lambda p, b, r, rp: dpo.dpo_loss(p, b, r, rp, cfg=cfg, beta=0.1)
    opt = optax.sgd(0.1)  # Linear in the gradient (see numerics.py).
    step = train_lib.make_train_step(loss_fn, opt)
    batch = jax.tree.map(jnp.asarray, batch)
    one = jax.jit(step)(train_lib.TrainState.create(params, opt), batch, jax.random.key(0))
    grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, None, None)[0]))
    one_grads = grad(params, batch)
    for shape, rules in (((8, 1, 1), "data_parallel"), ((2, 4, 1), "fsdp")):
      mesh, rules = sharding.make_mesh(*shape), sharding.RULES[rules]
      with sharding.activate(mesh, rules):
        sharded = sharding.init_sharded(cfg, jax.random.key(0), mesh, rules, stddev=0.3)
        state = train_lib.TrainState.create(sharded, opt)
        sharded_batch = sharding.shard_batch(batch, mesh, rules)
        grads = grad(sharded, sharded_batch)
        out = jax.jit(step)(state, sharded_batch, jax.random.key(0))
      assert_close(out[1]["loss"], one[1]["loss"])
      assert_trees_close(grads, one_grads)
      assert_trees_close(out[0].params, one[0].params)
      print("OK", shape, float(out[1]["loss"]))
""")


def test_preference_step_on_8_fake_devices_matches_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _PREFERENCE_8, os.path.dirname(__file__)],
                       env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.count("OK") == 2


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_skips_finished_ones(tmp_path):
  require_embedded()
  cmd = [sys.executable, "-m", "jaxscore.self_explore",
         f"--config={ROOT / 'configs' / 'self_explore.py'}:cpu,runlocal", f"--workdir={tmp_path}"]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1200)
  assert out.returncode == 0, out.stderr[-4000:]
  for stage in ("sft", "sample", "rft", "explore"):
    assert (tmp_path / stage / "done.json").exists(), stage
  results = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert list(results["models"]) == ["base", "SFT", "RFT", "outcome DPO", "Self-Explore"]
  assert results["num_problems"] == 4 and "pits" in results
  assert (tmp_path / "eval" / "accuracy.png").stat().st_size > 0
  assert "| Self-Explore |" in out.stdout
  again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1200)
  assert again.returncode == 0, again.stderr[-4000:]
  assert "[sft]" not in again.stdout and "[sample]" not in again.stdout  # Skipped.
  assert again.stdout.count("evaluated earlier") == 5  # Every model, the same table.
  table = lambda text: [l for l in text.splitlines() if l.startswith("|")]
  assert table(again.stdout) == table(out.stdout)


def test_exploration_scores_the_completion_not_the_prefix():
  # From the prefix "...\nThe answer is 57.\n" (a rationale that states the right answer
  # and then goes on) every completion answers 1: scoring prefix + completion would
  # find the prefix's 57 and see no pit at step 3.
  wrong = "7 × 9 = 63\n63 - 6 = 57\nThe answer is 57.\nNo wait, 63 - 6 = 1.\n"

  def continue_fn(queries, k):
    return [["The answer is 57." if prefix.count("\n") < 2 else "The answer is 1."] * k
            for _, prefix in queries]

  (run,) = explore.explore([(PROBLEM, RIGHT, wrong)], continue_fn, TASK, k=2)
  assert run.pit == 2 and run.correct == [[True, True], [False, False]]


def test_a_correct_answer_through_a_wrong_equation_is_no_correct_rationale():
  assert explore.equation_holds("<<48/2=24>>") and explore.equation_holds("7 × 9 = 63")
  assert explore.equation_holds("<<5*12+3=63>>") and explore.equation_holds("1,200 - 200 = 1,000")
  assert not explore.equation_holds("<<48/2=25>>") and not explore.equation_holds("<<2**999=1>>")
  assert not explore.equation_holds("<<x+1=2>>") and not explore.equation_holds("<<1/0=1>>")
  lucky = "Natalia sold <<48/2=25>>25 clips.\nThe answer is 72."
  honest = "Natalia sold <<48/2=24>>24 clips, <<48+24=72>>72 in all.\nThe answer is 72."
  rft, pairs = explore.rationale_data([lucky, honest], ["The answer is 70."], 8, "gsm8k",
                                      np.random.default_rng(0))
  assert rft == [honest] and pairs == [(honest, "The answer is 70.")]


def test_math_rules_dedupe_by_edit_distance_and_pair_the_shortest_distant_wrong_one():
  base = "We compute $2 + 2 = 4$, so the final answer is $4$."
  near = base.replace("compute", "computed")  # Edit distance 1: a duplicate.
  other = "Doubling two gives four. Final Answer: The final answer is $4$."
  kept = explore.distinct_by_edit_distance([base, near, other], 8, np.random.default_rng(0))
  assert len(kept) == 2 and other in kept and (base in kept) != (near in kept)
  # Normalised edit distances to `base`: the long repetitive wrong answer is far (> 0.5)
  # but longer; the short one is far too, so it is taken; one that is close (< 0.3) is
  # taken only when nothing is farther.
  long_far = "Let x be the sum. " * 8 + "The final answer is $5$."
  short_far = "It is $5$."
  close = base.replace("$4$.", "$5$.")
  dist = {w: explore.normalized_edit_distance(base, w) for w in (long_far, short_far, close)}
  assert dist[long_far] > 0.5 and dist[short_far] > 0.5 and dist[close] < 0.3
  assert explore.outcome_pairs_math([base], [long_far, short_far, close]) == [(base, short_far)]
  assert explore.outcome_pairs_math([base, other], [close]) == [(base, close)]
  # Between the thresholds: above 0.4 beats a shorter one at 0.35.
  mid = [w for w in ("x" * n + " $5$." for n in range(1, 80))
         if 0.4 < explore.normalized_edit_distance(base, w) <= 0.5]
  low = [w for w in ("We compute $2 + 2 = 4$, " + "y" * n for n in range(1, 60))
         if 0.3 < explore.normalized_edit_distance(base, w) <= 0.4]
  assert mid and low
  assert explore.outcome_pairs_math([base], [low[0], mid[-1]]) == [(base, mid[-1])]


def test_long_pairs_lose_the_start_of_the_prompt_before_the_end_of_a_completion():
  from jaxscore.objectives import base

  prompt, pair = [1, 2, 3, 4, 5, 6], [[7, 8, 9], [10]]
  # Width 7: the prompt gives up its first two tokens, the completions stay whole.
  assert base.fit_to_width(prompt, pair, 7) == ([3, 4, 5, 6], pair, True, False)
  # Width 4: the prompt keeps half the width; only then the longer completion is cut.
  assert base.fit_to_width(prompt, pair, 4) == ([5, 6], [[7, 8], [10]], True, True)
  assert base.fit_to_width(prompt, pair, 9) == (prompt, pair, False, False)
  # A collated pair: the chosen reply ends with its answer and end of turn (11, 12) in
  # the batch, and both rows see the same trimmed prompt.
  examples = [{"prompt": list(range(20, 30)), "chosen": [7, 8, 11, 12], "rejected": [9]}]
  b = dpo.collate_pairs(examples, 8, with_reference=False)
  tokens, target = np.asarray(b.tokens_2BxT), np.asarray(b.target_2BxT)
  assert tokens[0].tolist() == [26, 27, 28, 29, 7, 8, 11, 12]
  assert target[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
  assert tokens[1, :5].tolist() == [26, 27, 28, 29, 9] and target[1].sum() == 1
  assert dpo.truncation_counts(examples + PAIRS, 8) == {"prompt_trimmed": 1,
                                                       "completion_cut": 0}
  assert dpo.truncation_counts(examples, 6) == {"prompt_trimmed": 1, "completion_cut": 1}


def test_a_rerun_evaluates_only_models_whose_parameters_or_settings_changed(tmp_path,
                                                                            monkeypatch):
  """The evaluate stage keys each model's scores on its parameters' checksums, the
  problems and the settings: a finished pipeline's rerun evaluates nothing, a retrained
  model (new parameters) or a changed setting is evaluated again, and two models with
  the same parameters (a DPO stage with too few pairs returns the RFT model) once."""
  import importlib.util

  from jaxscore import evaluate as evaluate_lib
  from jaxscore.self_explore import pipeline

  spec = importlib.util.spec_from_file_location("se_config", ROOT / "configs" / "self_explore.py")
  se_config = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(se_config)

  calls = []

  def run_protocol(params, setup, problems, protocol, **kwargs):
    calls.append(float(params["w"][0]))
    scores = [float(i < params["w"][0]) for i in range(len(problems))]
    return {}, [{"id": p.id, "w": calls[-1]} for p in problems], {"acc@t1": scores}

  monkeypatch.setattr(evaluate_lib, "run_protocol", run_protocol)
  c = se_config.get_config("cpu,runlocal")
  line = pipeline.Pipeline.__new__(pipeline.Pipeline)
  line.c, line.workdir = c, tmp_path
  line.setup = types.SimpleNamespace(task=make_task("arithmetic", **c.task.kwargs.to_dict()))
  w = lambda v: {"w": jnp.array([v, 0.5], jnp.float32)}
  models = {"RFT": w(1.0), "outcome DPO": w(1.0), "Self-Explore": w(2.0)}

  first = line.evaluate(models)
  assert calls == [1.0, 2.0]  # outcome DPO is the RFT model: evaluated once.
  assert first["models"]["RFT"] == first["models"]["outcome DPO"] != \
      first["models"]["Self-Explore"]
  assert [json.loads(l)["w"] for l in (tmp_path / "eval" / "outcome_DPO.jsonl").open()] == \
      [1.0] * c.evaluate.num_problems
  assert line.evaluate(models) == first and calls == [1.0, 2.0]  # A rerun: nothing.
  line.evaluate(models | {"Self-Explore": w(3.0)})  # Retrained.
  assert calls == [1.0, 2.0, 3.0]
  c.unlock()
  c.evaluate.max_new_tokens += 1
  line.evaluate(models)  # Every model again, each distinct one once.
  assert calls == [1.0, 2.0, 3.0, 1.0, 2.0]
  # A model given as a function is loaded when its turn comes, after those before it.
  loaded = []
  line.evaluate({"RFT": w(5.0), "Self-Explore": lambda: loaded.append(list(calls)) or w(6.0)})
  assert calls[-2:] == [5.0, 6.0] and loaded == [calls[:-1]]


def test_a_finished_stage_is_read_back_and_one_that_did_not_train_is_its_start(tmp_path):
  """What `Pipeline.run` holds instead of every stage's model: a finished stage's model
  read back from its checkpoint equals the one training returned; a stage that did not
  train (too few examples or pairs) stands for the model it would have started from."""
  import importlib.util

  from test_checkpoint import _tiny_setup

  from jaxscore.self_explore import pipeline

  spec = importlib.util.spec_from_file_location("se_config", ROOT / "configs" / "self_explore.py")
  se_config = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(se_config)
  c = se_config.get_config("cpu,runlocal")
  c.train_sft.offline.batch_size, c.train_sft.offline.num_epochs = 2, 1
  setup, params = _tiny_setup()
  line = pipeline.Pipeline.__new__(pipeline.Pipeline)
  line.c, line.workdir, line.setup, line.base_params = c, tmp_path, setup, params
  examples = [{"prompt": [1, 2, 3], "completion": [4 + i, 5]} for i in range(4)]
  trained = line._train("sft", "sft", "train_sft", examples, params, params)
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, trained, params)))
  jax.tree.map(np.testing.assert_array_equal, line.stage_model("sft", params), trained)
  assert line.stage_model("rft", params) is params
  assert line.stage_model("dpo_step", trained) is trained
