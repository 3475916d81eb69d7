"""`jaxscore plan`: every variant of every config file planned on 8 fake devices; a run
that does not fit, a contradiction between fields and a bad key are each reported."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import require_embedded

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Planning compiles, and XLA's CPU backend at -O0 compiles several times faster with the
# same buffer assignment (the memory analysis is what plan reads; checked equal on every
# variant). Hub datasets are offline here: without the flags each attempt retries.
ENV = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
           XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                     "--xla_backend_optimization_level=0")


def _tiny(tmp_path, **fields):
  """A model directory with only a config.json: plan reads shapes, never weights."""
  d = tmp_path / "tiny"
  d.mkdir(exist_ok=True)
  (d / "config.json").write_text(json.dumps(dict(
      model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2) | fields))
  return d


def _module(file: str):
  spec = importlib.util.spec_from_file_location(file[:-3], ROOT / "configs" / file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _plan(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "jaxscore.cli", "plan", *args], env=ENV,
                        capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_every_variant_of_every_config_file_is_planned():
  require_embedded()  # Its tokenizer measures the cpu variants' prompts.
  out = subprocess.run([sys.executable, str(ROOT / "tests" / "plan_check.py")], env=ENV,
                       capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
  planned = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("OK ")]
  declared = {f: _module(f).VARIANTS for f in ("score.py", "study.py", "self_explore.py")}
  assert planned == [f"configs/{f}:{v}" for f, vs in declared.items() for v in vs]
  assert len(planned) == 11, planned


def test_weights_per_device_follow_the_sharding(tmp_path):
  """Resident weights are the parameter count times 4 bytes, replicated on every device
  (data_parallel), an eighth of it with fsdp over 8 devices, a quarter with fsdp inside
  each of two slices (the slices hold a copy each)."""
  tiny = _tiny(tmp_path)
  norms = 2 * 2 * 64 + 64  # Two per layer and the final one: never split.
  matrices = 2 * 512 * 64 + 2 * (2 * 64 * 4 * 16 + 2 * 64 * 2 * 16 + 3 * 64 * 128)
  for rules, mesh, share in (("data_parallel", ["--config.mesh.data=-1"], 1),
                             ("fsdp", ["--config.mesh.fsdp=-1"], 8),
                             ("fsdp", ["--config.mesh.fsdp=-1", "--config.mesh.dcn=2"], 4)):
    out = _plan("--config=configs/score.py:cpu", "--hbm_gib=1", f"--model={tiny}",
                "--prompt_len=32", f"--config.mesh.rules={rules}", "--config.mesh.data=1"
                if rules == "fsdp" else "--config.mesh.fsdp=1", *mesh)
    assert out.returncode == 0, out.stderr[-3000:]
    resident = next(l for l in out.stdout.splitlines() if "resident:" in l)
    weights = float(resident.split("weights ")[1].split(",")[0])
    expected = 4 * (matrices / share + norms) / 2**30
    assert abs(weights - expected) < 0.001 * expected, (rules, resident, expected)
    assert out.stdout.splitlines()[-1].startswith("fits:")
  # QLoRA: the seven projections at half a byte (nf4) plus a float32 scale per block
  # of 8 inputs, the embeddings and norms as they were, all split over 8 devices.
  out = _plan("--config=configs/score.py:cpu", "--hbm_gib=1", f"--model={tiny}",
              "--prompt_len=32", "--config.mesh.rules=fsdp", "--config.mesh.data=1",
              "--config.mesh.fsdp=-1", "--config.model.lora.rank=4",
              "--config.model.lora.quantize=nf4", "--config.model.lora.quant_block=8")
  assert out.returncode == 0, out.stderr[-3000:]
  resident = next(l for l in out.stdout.splitlines() if "resident:" in l)
  weights = float(resident.split("weights ")[1].split(",")[0])
  projections = matrices - 2 * 512 * 64
  expected = (4 * 2 * 512 * 64 / 8 + (0.5 + 4 / 8) * projections / 8 + 4 * norms) / 2**30
  assert abs(weights - expected) < 0.001 * expected, (resident, expected)
  assert "optimizer" in resident and "adapters" in resident


def test_a_run_that_does_not_fit_exits_1_with_what_would_help(tmp_path):
  out = _plan("--config=configs/score.py:cpu", "--hbm_gib=0.001",
              f"--model={_tiny(tmp_path)}", "--prompt_len=32", "--config.model.remat=none")
  assert out.returncode == 1, out.stderr[-3000:]
  last = out.stdout.splitlines()[-1]
  assert last.startswith("does not fit: peak") and "model.remat=full" in last
  assert "more devices" in last


def test_contradicting_fields_and_unknown_keys_are_user_errors(tmp_path):
  tiny = _tiny(tmp_path)
  # 2 prompts x 2 samples cannot split over 8 devices: known only once the mesh is.
  out = _plan("--config=configs/score.py:cpu,runlocal", f"--model={tiny}", "--hbm_gib=1")
  assert out.returncode == 2, out.stderr
  assert "rollout.prompts_per_step x rollout.group_size = 4 rows do not split over " \
         "mesh.dcn x mesh.data x mesh.fsdp = 8" in out.stderr
  out = _plan("--config=configs/score.py:cpu", f"--model={tiny}", "--hbm_gib=1",
              "--config.objective=grpo", "--config.grpo.minibatches=3")
  assert out.returncode == 2 and "grpo.minibatches=3" in out.stderr, out.stderr
  assert "rollout.prompts_per_step" in out.stderr  # Both fields are named.
  out = _plan("--config=configs/score.py:cpu", "--config.rollout.grup_size=2")
  assert out.returncode == 2 and "rollout.grup_size is not a config field" in out.stderr
  out = _plan("--config=configs/nope.py:cpu")
  assert out.returncode == 2 and "no config file configs/nope.py" in out.stderr
  out = _plan("--config=configs/score.py:cpu", "--topology=v5e:2x4", f"--model={tiny}")
  assert out.returncode == 2 and "--topology=v5e:2x4" in out.stderr
  out = _plan("--config=configs/score.py:cpu", "--slices=2", f"--model={tiny}")
  assert out.returncode == 2 and "--slices=2 needs --topology" in out.stderr
  out = _plan("--config=configs/score.py:cpu", "--config.mesh.dcn=3", f"--model={tiny}",
              "--hbm_gib=1")
  assert out.returncode == 2 and "mesh.dcn=3 slices do not divide 8 devices" in out.stderr


def test_a_program_the_compiler_refuses_for_memory_does_not_fit():
  """A TPU compile that runs out of HBM raises; plan reads what it needed from the error
  (the run does not fit) instead of crashing."""
  from jaxscore import plan

  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
             "HLO temporaries (2.55T) exceeds available HBM (15.75G).")
  assert plan._refused_bytes(message) == 2.55 * 2**40
  assert plan._refused_bytes("INVALID_ARGUMENT: bad shape (3)") is None

  class Refused:
    def as_text(self):
      return "refused program"

    def compile(self):
      raise RuntimeError(message)

  assert plan._memory(Refused()) == (2.55 * 2**40, 2.55 * 2**40)


def test_sampling_in_consecutive_batches_divides_the_kv_cache(tmp_path):
  tiny = _tiny(tmp_path)
  cache = {}
  for batches in (1, 2):
    out = _plan("--config=configs/score.py:cpu", "--hbm_gib=1", f"--model={tiny}",
                "--prompt_len=32", f"--config.rollout.sample_batches={batches}")
    assert out.returncode == 0, out.stderr[-3000:]
    resident = next(l for l in out.stdout.splitlines() if "resident:" in l)
    cache[batches] = float(resident.split("KV cache ")[1].split()[0])
  assert cache[2] == pytest.approx(cache[1] / 2, rel=0.01), cache


def test_evaluation_is_planned_and_its_rows_are_what_would_help(tmp_path):
  """Evaluation samples outside training, with the weights alone resident: rows enough
  to make it the peak are reported as evaluation's, with its batch as the remedy."""
  tiny = _tiny(tmp_path)
  out = _plan("--config=configs/score.py:cpu", "--hbm_gib=0.05", f"--model={tiny}",
              "--prompt_len=32", "--config.evaluate.batch_size=4096")
  assert out.returncode == 1, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  start = lines.index("evaluation  [greedy: 4096 rows x 107 tokens, 2 turn(s)]")
  assert lines[start + 1].startswith("  resident: weights ")
  assert "optimizer" not in lines[start + 1] and "KV cache" in lines[start + 1]
  assert "(sampler prefill, evaluation)" in lines[-1] or \
      "(sampler decode, evaluation)" in lines[-1], lines[-1]
  assert "--config.evaluate.batch_size=2048" in lines[-1]


def _resident(stdout: str, program: str) -> dict[str, float]:
  lines = stdout.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith(program + "  ["))
  items = lines[start + 1].split("resident: ")[1].removesuffix(" GiB").split(", ")
  return {k: float(v) for k, v in (item.rsplit(" ", 1) for item in items)}


def test_self_explore_stages_hold_the_models_the_pipeline_holds(tmp_path):
  """Full fine-tuning: DPO's train state beside the base and the RFT model (its start
  and reference); evaluation holds both and the model it evaluates. LoRA: DPO adapts the
  RFT model as its frozen base (no other copy); QLoRA: that base quantized, the merged
  RFT model and the quantized original beside it."""
  tiny = _tiny(tmp_path)
  args = ["--config=configs/self_explore.py:cpu", "--hbm_gib=1", f"--model={tiny}",
          "--prompt_len=32"]
  full = _plan(*args)
  assert full.returncode == 0, full.stderr[-3000:]
  dpo = _resident(full.stdout, "stages dpo_step, dpo_outcome")
  assert dpo["base"] == dpo["RFT model"] == dpo["weights"]
  evaluation = _resident(full.stdout, "evaluation (each model in turn)")
  assert evaluation["base"] == evaluation["RFT model"] == evaluation["weights"] == dpo["weights"]
  assert _resident(full.stdout, "stage sft")["base"] == dpo["weights"]
  lora_run = _plan(*args, "--config.model.lora.rank=4")
  assert lora_run.returncode == 0, lora_run.stderr[-3000:]
  dpo = _resident(lora_run.stdout, "stages dpo_step, dpo_outcome")
  assert "RFT model" not in dpo and dpo["base"] == dpo["weights"]
  qlora = _plan(*args, "--config.model.lora.rank=4", "--config.model.lora.quantize=nf4",
                "--config.model.lora.quant_block=8")
  assert qlora.returncode == 0, qlora.stderr[-3000:]
  dpo = _resident(qlora.stdout, "stages dpo_step, dpo_outcome")
  merged = _resident(lora_run.stdout, "evaluation (each model in turn)")["weights"]
  assert dpo["base"] == dpo["weights"] < merged and dpo["RFT model"] == merged
