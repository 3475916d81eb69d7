"""Launch scripts (dry runs) and the sweep launcher."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from jaxscore import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _dry(script, *args, **env):
  out = subprocess.run(["bash", str(ROOT / "launch" / script), "--dry-run", *args],
                       env=dict(os.environ, **env), capture_output=True, text=True)
  return out.returncode, out.stdout, out.stderr


TPU = dict(TPU_NAME="score-v4", ZONE="us-central2-b", PROJECT="my-proj")


def test_tpu_vm_create_uses_accelerator_runtime_and_spot():
  rc, out, _ = _dry("tpu_vm.sh", "create", ACCELERATOR="v4-32", SPOT="1", **TPU)
  assert rc == 0
  assert out.strip() == ("gcloud compute tpus tpu-vm create score-v4 --zone=us-central2-b "
                         "--project=my-proj --accelerator-type=v4-32 "
                         "--version=tpu-ubuntu2204-base --spot")


def test_tpu_vm_setup_and_run_go_to_every_worker():
  rc, out, _ = _dry("tpu_vm.sh", "setup", REPO="https://example.com/jaxscore.git", **TPU)
  assert rc == 0
  lines = out.strip().splitlines()
  assert all("--worker=all" in line for line in lines)
  assert "git\\ clone" in lines[0] and "pip\\ install\\ -e\\ \\'.\\[tpu\\]" in lines[1]
  rc, out, _ = _dry("tpu_vm.sh", "run", "--", "--config.score.alpha=5",
                    CONFIG="configs/score.py:math",
                    WORKDIR="gs://bucket/run1", **TPU)
  assert rc == 0
  assert "tpu-vm ssh score-v4 --zone=us-central2-b --project=my-proj --worker=all" in out
  for part in ("JAXSCORE_DISTRIBUTED=auto", "jaxscore.main", "--config=configs/score.py:math",
               "--workdir=gs://bucket/run1", "--config.score.alpha=5"):
    assert part in out.replace("\\", "")


def test_tpu_vm_logs_tensorboard_delete():
  assert "--worker=0 --command=tail" in _dry("tpu_vm.sh", "logs", **TPU)[1]
  tb = _dry("tpu_vm.sh", "tensorboard", WORKDIR="gs://b/r", **TPU)[1]
  assert "-L 6006:localhost:6006" in tb and "tensorboard" in tb
  assert _dry("tpu_vm.sh", "delete", **TPU)[1].strip().endswith("--quiet")


def test_tpu_vm_requires_its_variables():
  rc, _, err = _dry("tpu_vm.sh", "create", ZONE="z")
  assert rc != 0 and "TPU_NAME" in err
  rc, _, err = _dry("tpu_vm.sh", "run", **TPU)
  assert rc != 0 and "CONFIG" in err


XPK = dict(CLUSTER="score-gke", ZONE="us-west4-a", PROJECT="my-proj")


def test_xpk_create_asks_for_the_slices_and_capacity():
  rc, out, _ = _dry("xpk.sh", "create", ACCELERATOR="v5litepod-16", NUM_SLICES="2", SPOT="1",
                    **XPK)
  assert rc == 0
  assert out.strip() == ("xpk cluster create --cluster=score-gke --zone=us-west4-a "
                         "--project=my-proj --tpu-type=v5litepod-16 --num-slices=2 --spot")
  out = _dry("xpk.sh", "create", RESERVATION="res-1", **XPK)[1]
  assert "--tpu-type=v5litepod-16 --num-slices=1 --reservation=res-1" in out


def test_xpk_run_is_one_workload_data_parallel_over_the_slices():
  env = dict(XPK, NUM_SLICES="2", CONFIG="configs/score.py:math", WORKDIR="gs://b/run1",
             WORKLOAD="score-math-1")
  rc, out, _ = _dry("xpk.sh", "run", "--", "--config.score.alpha=5", **env)
  assert rc == 0
  plain = out.replace("\\", "")
  assert plain.startswith("xpk workload create --cluster=score-gke --zone=us-west4-a "
                          "--project=my-proj --workload=score-math-1 --tpu-type=v5litepod-16 "
                          "--num-slices=2 --base-docker-image=python:3.11 --script-dir=")
  for part in ("JAXSCORE_DISTRIBUTED=auto python -m jaxscore.main", "--config.mesh.dcn=2",
               "--config=configs/score.py:math", "--workdir=gs://b/run1",
               "--config.score.alpha=5", "pip install -q -e '.[tpu]'"):
    assert part in plain, part
  built = _dry("xpk.sh", "run", IMAGE="gcr.io/p/jaxscore:1", **env)[1].replace("\\", "")
  assert "--docker-image=gcr.io/p/jaxscore:1 --command=cd /app && JAXSCORE" in built
  assert "pip install" not in built
  rc, out, _ = _dry("xpk.sh", "build", IMAGE="gcr.io/p/jaxscore:1", **XPK)
  assert rc == 0 and "docker build -t gcr.io/p/jaxscore:1 -f" in out and "docker push" in out
  assert (ROOT / "launch" / "Dockerfile").exists()


def test_xpk_logs_list_stop_delete():
  logs = _dry("xpk.sh", "logs", WORKLOAD="score-math-1", **XPK)[1].splitlines()
  assert logs[0].startswith("gcloud container clusters get-credentials score-gke "
                            "--zone=us-west4-a --project=my-proj")
  assert "jobset-name=score-math-1" in logs[1] and "job-completion-index=0" in logs[1]
  assert _dry("xpk.sh", "list", **XPK)[1].startswith("xpk workload list --cluster=score-gke")
  assert _dry("xpk.sh", "stop", WORKLOAD="w1", **XPK)[1].strip().endswith("--workload=w1")
  assert _dry("xpk.sh", "delete", **XPK)[1].startswith("xpk cluster delete --cluster=score-gke")


def test_xpk_requires_its_variables():
  rc, _, err = _dry("xpk.sh", "create", ZONE="z")
  assert rc != 0 and "CLUSTER" in err
  for cmd, missing in (("run", "CONFIG"), ("logs", "WORKLOAD"), ("stop", "WORKLOAD"),
                       ("build", "IMAGE")):
    rc, _, err = _dry("xpk.sh", cmd, **dict(XPK, WORKLOAD="")) if missing == "WORKLOAD" \
        else _dry("xpk.sh", cmd, **XPK)
    assert rc != 0 and missing in err, (cmd, err)


def test_sweep_on_xpk_submits_one_named_workload_per_run(tmp_path):
  runs = [{"score.alpha": 1.0}, {"score.alpha": 10.0}, {"model.name": "Qwen/Qwen3-8B"}]
  cmds = sweep.commands("configs/score.py:math", "gs://b/sweep", runs, "xpk")
  names = [next(a for a in c if a.startswith("WORKLOAD=")).split("=", 1)[1] for c in cmds]
  assert len(set(names)) == 3
  assert all(re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", n) and len(n) <= 40 for n in names)
  assert cmds[1][-4:] == [str(ROOT / "launch" / "xpk.sh"), "run", "--",
                          "--config.score.alpha=10.0"]
  assert "WORKDIR=gs://b/sweep/score.alpha=10.0" in cmds[1]


def test_gpu_host_multi_host_environment():
  rc, out, _ = _dry("gpu_host.sh", "run", "--", "--mode=train", NUM_HOSTS="2", HOST_ID="1",
                    COORDINATOR="10.0.0.2:1234", CONFIG="configs/score.py:gsm8k",
                    WORKDIR="/shared/run")
  assert rc == 0
  for part in ("JAXSCORE_COORDINATOR=10.0.0.2:1234", "JAXSCORE_NUM_PROCESSES=2",
               "JAXSCORE_PROCESS_ID=1", "-m jaxscore.main", "--mode=train"):
    assert part in out
  rc, _, err = _dry("gpu_host.sh", "run", NUM_HOSTS="2", CONFIG="c", WORKDIR="w")
  assert rc != 0 and "COORDINATOR" in err


def test_sweep_expands_into_named_runs(tmp_path):
  config = str(ROOT / "configs" / "score.py") + ":cpu"
  runs = sweep.load_sweep(config)
  assert len(runs) == 4
  cmds = sweep.commands(config, str(tmp_path), runs, "local")
  workdirs = [c[4] for c in cmds]
  assert workdirs[0] == f"--workdir={tmp_path}/score.alpha=1.0,optim.learning_rate=1e-05"
  assert len(set(workdirs)) == 4
  assert cmds[0][-2:] == ["--config.score.alpha=1.0", "--config.optim.learning_rate=1e-05"]
  tpu = sweep.commands(config, "gs://b/s", runs, "tpu")
  assert tpu[0][-4:-2] == ["run", "--"]
  assert "WORKDIR=gs://b/s/score.alpha=1.0,optim.learning_rate=1e-05" in tpu[0]


def test_sweep_summary_table(tmp_path):
  runs = [{"score.alpha": 1.0}, {"score.alpha": 10.0}]
  for r, acc in zip(runs, (0.25, 0.5)):
    d = tmp_path / sweep.run_name(r)
    d.mkdir()
    (d / "report.json").write_text(json.dumps(
        {"before": {"acc@t1": 0.1}, "after SCoRe": {"acc@t1": acc, "acc@t2": acc + 0.1}}))
  table = sweep.summary(str(tmp_path), runs).splitlines()
  assert table[0] == "| run | acc@t1 | acc@t2 |"
  assert table[2] == "| score.alpha=1.0 | 0.25 | 0.35 |"
  assert table[3] == "| score.alpha=10.0 | 0.5 | 0.6 |"


def test_sweep_rejects_unknown_keys(tmp_path):
  cfg = tmp_path / "bad.py"
  cfg.write_text((ROOT / "configs" / "score.py").read_text() +
                 "\ndef get_sweep(arg='cpu'):\n  return [{'score.alpah': 1.0}]\n")
  with pytest.raises(ValueError, match="score.alpah"):
    sweep.load_sweep(str(cfg) + ":cpu")


def test_sweep_dry_run_command_line(tmp_path):
  out = subprocess.run([sys.executable, "-m", "jaxscore.sweep",
                        f"--config={ROOT / 'configs' / 'score.py'}:cpu",
                        f"--workdir={tmp_path}", "--dry_run"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.count("jaxscore.main") == 4


def test_config_typo_is_an_error():
  sys.path.insert(0, str(ROOT))
  from configs import score

  c = score.get_config("cpu")
  with pytest.raises(AttributeError):
    c.score.alpah = 3.0
  with pytest.raises(ValueError, match="unknown variant"):
    score.get_config("tpu")
  for variant in ("cpu", "gsm8k", "math", "code", "cpu,runlocal"):
    score.get_config(variant)
  out = subprocess.run([sys.executable, "-m", "jaxscore.main",
                        f"--config={ROOT / 'configs' / 'score.py'}:cpu",
                        "--workdir=/tmp/unused", "--config.score.alpah=3"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert out.returncode != 0 and "alpah" in out.stderr
