"""Two processes on 127.0.0.1 with jax.distributed, 2 CPU devices each: a short SCoRe run
checkpoints, stops, resumes, and both processes end with the same params and the same
evaluation of them (rows split over both hosts, greedy and pass@k); a model loads onto
both hosts' mesh."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
from conftest import require_embedded

pytestmark = pytest.mark.slow
SCRIPT = pathlib.Path(__file__).with_name("multihost_check.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_checkpoint_resume_and_agree(tmp_path):
  require_embedded()
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(port), str(i), str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  results = [json.loads(next(l for l in out.splitlines() if l.startswith("RESULT"))[7:])
             for out, _ in outs]
  assert {r["process"] for r in results} == {0, 1}
  assert results[0]["step"] == results[1]["step"] == 3
  assert results[0]["digest"] == results[1]["digest"]
  # Each process scores its own rows; both end with every row's attempts and rewards.
  assert results[0]["evaluation"] == results[1]["evaluation"]
  assert len(results[0]["evaluation"][1]) == 6
  assert results[0]["pass@k"] == results[1]["pass@k"]
  assert [len(r["samples"]) for r in results[0]["pass@k"][1]] == [2, 2, 2]
  metrics = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(m)["step"] for m in metrics] == [1, 2, 3]  # Written by process 0 only.
  steps = sorted(int(d.name) for d in (tmp_path / "checkpoints").iterdir() if d.name.isdigit())
  assert steps[-1] == 3
