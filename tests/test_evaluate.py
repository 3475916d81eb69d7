"""Evaluation metrics on hand-made outcomes, report tables, and evaluating a trained
checkpoint rather than the base model."""

import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import report_parity, require_embedded, require_torch

from jaxscore import evaluate

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Ten problems, two turns: 2 i->c, 1 c->i, 3 c->c, 4 i->i.
TWO_TURNS = np.array([[0, 1]] * 2 + [[1, 0]] + [[1, 1]] * 3 + [[0, 0]] * 4)


def test_two_turn_metrics_by_hand():
  m = evaluate.metrics(TWO_TURNS)
  assert m["acc@t1"] == pytest.approx(0.4)  # c->i + c->c = 4 of 10.
  assert m["acc@t2"] == pytest.approx(0.5)  # i->c + c->c = 5 of 10.
  assert m["delta(t1,t2)"] == pytest.approx(0.1)
  assert m["delta_i->c"] == pytest.approx(0.2)
  assert m["delta_c->i"] == pytest.approx(0.1)
  # SPEC: Delta = Delta i->c - Delta c->i exactly.
  assert m["delta(t1,t2)"] == pytest.approx(m["delta_i->c"] - m["delta_c->i"])
  assert m["pass@turns"] == pytest.approx(0.6)


def test_three_turn_metrics_compare_first_and_last():
  r = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0], [1, 1, 1]])
  m = evaluate.metrics(r)
  assert [m[f"acc@t{t}"] for t in (1, 2, 3)] == pytest.approx([0.5, 0.5, 0.5])
  assert m["delta(t1,t3)"] == pytest.approx(0.0)
  assert m["delta_i->c"] == pytest.approx(0.25) and m["delta_c->i"] == pytest.approx(0.25)
  assert m["pass@turns"] == pytest.approx(1.0)
  assert "delta(t1,t2)" not in m
  one = evaluate.metrics(np.array([[1], [0]]))
  assert one == {"acc@t1": 0.5, "pass@turns": 0.5}


def test_edit_distance_ratio_by_hand():
  # kitten -> sitting: 3 edits over 6 + 7 tokens; identical attempts: 0.
  ids = [[list("kitten"), [1, 2, 3]], [list("sitting"), [1, 2, 3]]]
  m = evaluate.metrics(np.array([[0, 0], [1, 1]]), ids)
  assert evaluate.edit_distance("kitten", "sitting") == 3
  assert m["edit_distance_ratio"] == pytest.approx((3 / 13 + 0.0) / 2)


def test_edit_distance_against_the_textbook_table():
  def textbook(a, b):  # Wagner-Fischer, cell by cell.
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
      for j in range(1, len(b) + 1):
        d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[-1][-1]

  rng = np.random.default_rng(0)
  for _ in range(300):
    a, b = (rng.integers(0, 4, rng.integers(0, 15)).tolist() for _ in range(2))
    assert evaluate.edit_distance(a, b) == textbook(a, b), (a, b)
    assert evaluate.edit_distance("".join(map(str, a)), "".join(map(str, b))) == textbook(a, b)
  assert evaluate.edit_distance("naïve café", "naive cafe") == 2


def test_training_batch_self_correction_metrics_by_hand():
  from jaxscore.loops import online

  # Rows: i->c, c->c, c->i, i->i; attempts identical, disjoint, dropped, both empty.
  rewards = np.array([[0, 1], [1, 1], [1, 0], [0, 0]])
  ids = [[[1, 2, 3], [1, 2], [5], []], [[1, 2, 3], [3, 4], [], []]]
  m = online.self_correction_metrics(rewards, ids)
  assert m == {"self_correction/delta": 0.0, "self_correction/delta_i_to_c": 0.25,
               "self_correction/delta_c_to_i": 0.25,
               "self_correction/edit_distance_ratio": pytest.approx((0 + 2 / 4 + 1 + 0) / 4)}
  # On at most 2 rows: the first and the last, both unchanged.
  assert online.self_correction_metrics(rewards, ids, max_rows=2)[
      "self_correction/edit_distance_ratio"] == 0.0


def test_report_table_names_turns_from_their_number():
  assert evaluate.table_keys(1) == ["acc@t1"]
  assert evaluate.table_keys(3) == ["acc@t1", "acc@t2", "acc@t3", "delta(t1,t3)",
                                    "delta_i->c", "delta_c->i"]
  table = evaluate.format_table({"before": evaluate.metrics(TWO_TURNS)}, 2).splitlines()
  assert table[0] == "| model | acc@t1 | acc@t2 | delta(t1,t2) | delta_i->c | delta_c->i |"
  assert table[2] == "| before | 40.0 | 50.0 | 10.0 | 20.0 | 10.0 |"


@pytest.mark.slow
def test_evaluate_mode_evaluates_the_trained_checkpoint(tmp_path):
  """Train rank-8 LoRA adapters on the embedded model for two smoke steps, then
  `--mode=evaluate` restores the workdir's checkpoint (not the base model) and reports
  it, and `jaxscore export` writes the merged model and the PEFT adapters."""
  require_embedded()
  config = f"--config={ROOT / 'configs' / 'score.py'}:cpu,runlocal"
  run = lambda *flags: subprocess.run(
      [sys.executable, "-m", "jaxscore.main", config, f"--workdir={tmp_path}",
       "--config.model.lora.rank=8", *flags],
      capture_output=True, text=True, cwd=ROOT, timeout=900)
  train = run("--mode=train", "--config.evaluate.num_problems=2")
  assert train.returncode == 0, train.stderr[-3000:]
  assert not (tmp_path / "report.json").exists()
  out = run("--mode=evaluate", "--config.evaluate.num_problems=2",
            "--config.evaluate.checkpoint=best")
  assert out.returncode == 0, out.stderr[-3000:]
  best = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  best_step = max(best, key=lambda r: (r["reward"], r["step"]))["step"]  # Ties: the later.
  assert f"evaluating the best checkpoint (step {best_step})" in out.stdout
  report = json.loads((tmp_path / "report.json").read_text())
  assert list(report) == ["after SCoRe"] and report["after SCoRe"]["num_problems"] == 2
  assert "| after SCoRe |" in out.stdout
  _export_round_trip(tmp_path, best_step)
  # `jaxscore evaluate` reads the run's own config and gives the same numbers.
  cli = subprocess.run([sys.executable, "-m", "jaxscore.cli", "evaluate", f"--workdir={tmp_path}",
                        "--step=best", "--num_problems=2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert cli.returncode == 0, cli.stderr[-3000:]
  assert f"| step {best_step} (best) |" in cli.stdout
  again = json.loads((tmp_path / "eval" / f"step{best_step}.json").read_text())["metrics"]
  compared = [k for k in report["after SCoRe"] if k.startswith(("acc@", "delta", "num_"))]
  assert "acc@t1" in compared
  assert {k: again[k] for k in compared} == {k: report["after SCoRe"][k] for k in compared}


def _export_round_trip(workdir, best_step):
  """`jaxscore export` writes a directory transformers loads, with the trained weights
  (the same logits as jaxscore on the restored params) and the chat template."""
  torch = require_torch()
  import transformers

  from jaxscore.export import run_config
  from jaxscore.loops import common
  from jaxscore.models import model as model_lib
  from jaxscore.models import pretrained
  from jaxscore.sampling import formats

  out = workdir / "exported"
  cli = lambda *a: subprocess.run([sys.executable, "-m", "jaxscore.cli", "export", *a],
                                  capture_output=True, text=True, cwd=ROOT, timeout=600)
  done = cli(f"--workdir={workdir}", "--step=best", f"--out={out}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert json.loads((out / "jaxscore_export.json").read_text())["step"] == best_step
  c = run_config(workdir)
  base = pretrained.from_config(c.model)
  params, step = common.restore_params(c, workdir, base.cfg, base.params, "best")
  assert step == best_step
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tok = transformers.AutoTokenizer.from_pretrained(out)
  ids = formats.ChatFormat(tok).prompt_ids("What is 2 + 3?")
  assert tok.chat_template and ids == formats.ChatFormat(base.tokenizer).prompt_ids(
      "What is 2 + 3?")
  with torch.no_grad():
    theirs = hf(torch.tensor([ids])).logits[0].numpy()
  ours = np.asarray(model_lib.apply(params, jnp.asarray([ids]), base.cfg)[0][0])
  trained = np.asarray(model_lib.apply(base.params, jnp.asarray([ids]), base.cfg)[0][0])
  report_parity("export: transformers logits vs jaxscore (trained)",
                np.abs(theirs - ours).max(), 2e-3)
  np.testing.assert_allclose(theirs, ours, atol=2e-3, rtol=1e-3)
  assert np.abs(ours - trained).max() > 1e-4  # The export holds the trained weights.
  # The adapters alone, on the base written beside them (a GGUF base has no
  # transformers directory of its own), in peft: the merged model's logits.
  peft = pytest.importorskip("peft")
  info = json.loads((out / "jaxscore_export.json").read_text())
  assert info["adapter_base"] == str(out / "base")
  hf_base = transformers.AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
  with_adapter = peft.PeftModel.from_pretrained(hf_base, info["adapter"]).eval()
  with torch.no_grad():
    peft_logits = with_adapter(torch.tensor([ids])).logits[0].numpy()
  np.testing.assert_allclose(peft_logits, ours, atol=2e-3, rtol=1e-3)
  # A user error is one line naming the problem, with no traceback.
  bad = cli(f"--workdir={workdir / 'missing'}", f"--out={out}")
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert "config.json does not exist" in bad.stderr.strip().splitlines()[-1]


def test_wilson_interval_closed_form():
  # 5 of 10 at 95%: centre 0.5, half-width 1.96 * sqrt(0.025 + 0.0096) / 1.384.
  lo, hi = evaluate.wilson_interval(5, 10)
  assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
  lo, hi = evaluate.wilson_interval(0, 40)
  assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.0876, abs=1e-4)


def test_paired_bootstrap_interval():
  a = np.array([1, 1, 0, 1, 0, 1, 1, 0] * 10, float)
  assert evaluate.paired_bootstrap(a, a) == (0.0, 0.0, 0.0)
  b = np.roll(a, 1)
  mean, lo, hi = evaluate.paired_bootstrap(a, b, num=4000)
  assert mean == pytest.approx(float(np.mean(a - b)))
  # Close to the normal approximation of the mean difference's 95% interval.
  se = np.std(a - b) / np.sqrt(len(a))
  assert lo == pytest.approx(mean - 1.96 * se, abs=0.03)
  assert hi == pytest.approx(mean + 1.96 * se, abs=0.03)
