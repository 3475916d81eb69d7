"""Soak: adversarial candidates scored back to back beside a training step.

  python benchmarks/sandbox_soak.py [--candidates 200] [--workers 2] [--out benchmarks/results]

A training process runs SCoRe train steps on the embedded model (8 x 160 tokens) for as
long as the scoring lasts, while this process scores `--candidates` hostile MBPP
candidates with `--workers` scoring workers through the path training uses
(`MBPPTask.score`, bubblewrap, the kernel bounds of jaxscore.tasks.bounds). The attacks
cycle through filling every writable path, spawning through the C extension loaded by
path, thread floods, fork bombs, an 8 GiB allocation, busy loops and output floods. A
watcher samples the host every 20 ms: available memory, shared memory (tmpfs pages) and
the number of tasks (processes and threads). Checked and written to `sandbox_soak.md` /
`.json`: every reward is 0; the training steps kept finishing; the host's available
memory never fell by more than the sandboxes' memory caps allow (plus the trainer's own
growth, measured before scoring starts); the task count never rose by more than the
process caps allow; and afterwards no sandbox process or cgroup is left.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import threading
import time

from bench_util import write_results  # pylint: disable=g-import-not-at-top

from jaxscore.tasks import bounds, make_task, sandbox
from jaxscore.tasks.base import Problem

ROOT = pathlib.Path(__file__).resolve().parents[1]

ATTACKS = {
    "fill_tmpfs": """
import os
def f():
  for d in ("/tmp", "/dev/shm", "/dev", "/"):
    for i in range(400):
      try:
        with open(os.path.join(d, f"fill{i}"), "wb") as out:
          out.write(b"x" * (4 << 20))
      except OSError:
        break
  return 1
""",
    "fork_exec_by_path": """
import glob, importlib.machinery, importlib.util, os, sys
def f():
  path = glob.glob(sys.base_prefix + "/lib/python3*/lib-dynload/_posixsubprocess*.so")[0]
  loader = importlib.machinery.ExtensionFileLoader("_posixsubprocess", path)
  spec = importlib.util.spec_from_file_location("_posixsubprocess", path, loader=loader)
  fork_exec = importlib.util.module_from_spec(spec).fork_exec
  args = [sys.executable.encode(), b"-c", b"while True: pass"]
  for _ in range(200):
    try:
      fork_exec(args, [args[0]], True, (), None, None, -1, -1, -1, -1, -1, -1, *os.pipe(),
                False, False, -1, None, None, None, -1, None, True)
    except Exception:
      pass
  return 1
""",
    "threads": """
import threading, time
def f():
  for _ in range(1000):
    try:
      threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    except Exception:
      pass
  return 1
""",
    "fork_bomb": "import os\ndef f():\n  while True:\n    os.fork()\n",
    "allocate_8g": "def f():\n  x = bytearray(8 << 30)\n  return 1\n",
    "busy": "def f():\n  while True: pass\n",
    "flood": "def f():\n  print('x' * (1 << 20) * 2000)\n  return 1\n",
}

TRAINER = """
import sys, time
sys.path.insert(0, {bench!r})
import jax
from jaxscore.loops import train as train_lib
from jaxscore.objectives import policy_gradient as pg
from bench_util import load_model
from train_memory import make_batch
cfg, params, _ = load_model("embedded", training=True)
cfg = cfg.replace(remat="full", logits_chunk=32)
opt = train_lib.make_optimizer(train_lib.OptimConfig(learning_rate=1e-6))
loss = lambda *a: pg.policy_gradient_loss(*a, cfg=cfg, loss_cfg=pg.PolicyLossConfig())
step = jax.jit(train_lib.make_train_step(loss, opt), donate_argnums=(0,))
state = train_lib.TrainState.create(jax.tree.map(lambda x: x.copy(), params), opt)
batch = make_batch(cfg, 8, 160)
while True:
  t0 = time.perf_counter()
  state, m = step(state, batch, jax.random.key(0), params)
  jax.block_until_ready(m)
  print("step", time.perf_counter() - t0, flush=True)
"""


def meminfo() -> dict[str, int]:
  out = {}
  for line in open("/proc/meminfo"):
    key, value = line.split(":")
    out[key] = int(value.split()[0]) * 1024
  return out


def host_tasks() -> int:
  n = 0
  for p in os.listdir("/proc"):
    if p.isdigit():
      try:
        n += len(os.listdir(f"/proc/{p}/task"))
      except OSError:
        pass
  return n


def leftovers() -> list[str]:
  ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
  procs = [l for l in ps.splitlines() if "sandbox/worker.py" in l]
  groups = [str(p) for p in bounds.CGROUP_ROOT.rglob("jaxscore-sandbox-*")]
  return procs + groups


def start_trainer():
  """A process running SCoRe train steps, and the (time, seconds) of each step it prints;
  returns once it is compiled and stepping, so its own memory is in the baseline."""
  trainer = subprocess.Popen([sys.executable, "-c", TRAINER.format(
      bench=str(ROOT / "benchmarks"))], stdout=subprocess.PIPE, text=True, cwd=ROOT)
  steps = []
  threading.Thread(target=lambda: [steps.append((time.monotonic(), float(l.split()[1])))
                                   for l in trainer.stdout if l.startswith("step")],
                   daemon=True).start()
  while len(steps) < 2:
    time.sleep(1)
    if trainer.poll() is not None:
      raise SystemExit("the training process died before scoring started")
  return trainer, steps


def score_attacks(candidates: int, workers: int, limits) -> tuple[dict, list, float]:
  """Scores `candidates` attacks in turn while a thread samples the host every 20 ms:
  (rewards by attack, host samples, seconds)."""
  samples, stop = [], threading.Event()

  def watch():
    while not stop.is_set():
      m = meminfo()
      samples.append((m["MemAvailable"], m["Shmem"], host_tasks()))
      time.sleep(0.02)

  watcher = threading.Thread(target=watch)
  watcher.start()
  task = make_task("mbpp", limits=limits, workers=workers)
  names = list(ATTACKS)
  rewards = {name: [] for name in names}
  t0 = time.monotonic()
  for start in range(0, candidates, 2 * workers):
    batch = [names[i % len(names)] for i in range(start, min(start + 2 * workers, candidates))]
    problems = [Problem(id=n, question="", prompt="", tests=("assert f() == 2",),
                        metadata={"setup": "", "reference": ""}) for n in batch]
    scores = task.score(problems, [f"```python\n{ATTACKS[n]}\n```" for n in batch])
    for n, s in zip(batch, scores):
      rewards[n].append(s.reward)
  seconds = time.monotonic() - t0
  stop.set()
  watcher.join()
  return rewards, samples, seconds


def report(results: dict, limits) -> list[str]:
  concurrent, names = 2 * results["workers"], list(ATTACKS)
  lines = ["# Sandbox soak (generated by benchmarks/sandbox_soak.py)", "",
           f"{results['candidates']} hostile candidates ({', '.join(names)}, in turn) scored "
           f"by {results['workers']} workers through `MBPPTask.score` in "
           f"{results['seconds']:.0f} s, beside a process running SCoRe train steps on the "
           f"embedded model ({results['train_steps_during']} steps finished meanwhile). "
           f"Bounds: {results['mode']}. Host sampled every 20 ms; baselines taken once the "
           "trainer was compiled and stepping.", "",
           "| measure | observed | allowed by the caps |", "|---|---|---|",
           f"| available memory, largest drop | {results['available_drop_gib']:.2f} GiB | "
           f"{results['memory_cap_gib']:.2f} GiB ({concurrent} sandboxes x "
           f"{limits.group_memory_bytes / 2**30:.2f}) |",
           f"| shared memory (tmpfs), largest rise | {results['shmem_rise_mib']:.0f} MiB | "
           f"{results['tmpfs_cap_mib']:.0f} MiB |",
           f"| host tasks, largest rise | {results['task_rise']} | {results['task_cap']} (+16 "
           "for the scorer's own threads) |",
           f"| sandbox processes or cgroups left | {len(results['leftovers'])} | 0 |", "",
           "| attack | candidates | total reward |", "|---|---|---|"]
  lines += [f"| {n} | {results['counts'][n]} | {results['rewards'][n]:g} |" for n in names]
  return lines + ["", "Checks: " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in
                                             results["checks"].items())]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--candidates", type=int, default=200)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  args = parser.parse_args()

  # A quarter CPU each: the 2 x workers sandboxes together take at most one core.
  limits = sandbox.Limits(timeout_s=6.0, cpu_seconds=3, cpus=0.25)
  mode = bounds.probe()
  trainer, steps = start_trainer()
  base_mem, base_tasks = meminfo(), host_tasks()
  steps_before = len(steps)
  rewards, samples, seconds = score_attacks(args.candidates, args.workers, limits)
  steps_during = len(steps) - steps_before
  trainer_alive = trainer.poll() is None
  trainer.kill()
  time.sleep(1.0)
  left = leftovers()
  concurrent = 2 * args.workers  # Candidate and tests sandboxes per worker.
  task_cap = concurrent * limits.processes
  results = dict(
      mode=mode.detail, candidates=args.candidates, workers=args.workers,
      seconds=seconds, rewards={n: sum(r) for n, r in rewards.items()},
      counts={n: len(r) for n, r in rewards.items()},
      train_steps_during=steps_during, trainer_alive=trainer_alive,
      available_drop_gib=(base_mem["MemAvailable"] - min(s[0] for s in samples)) / 2**30,
      memory_cap_gib=concurrent * limits.group_memory_bytes / 2**30,
      shmem_rise_mib=(max(s[1] for s in samples) - base_mem["Shmem"]) / 2**20,
      tmpfs_cap_mib=concurrent * 2 * limits.tmpfs_bytes / 2**20,
      task_rise=max(s[2] for s in samples) - base_tasks, task_cap=task_cap, leftovers=left,
      limits=dict(processes=limits.processes, memory_bytes=limits.memory_bytes,
                  tmpfs_bytes=limits.tmpfs_bytes, cpus=limits.cpus,
                  cpu_seconds=limits.cpu_seconds, timeout_s=limits.timeout_s))
  results["checks"] = checks = {
      "every reward is 0": all(v == 0 for v in results["rewards"].values()),
      "training kept stepping": steps_during >= 1 and trainer_alive,
      "available memory fell by less than the caps":
          results["available_drop_gib"] <= results["memory_cap_gib"],
      "tmpfs pages within the caps": results["shmem_rise_mib"] <= results["tmpfs_cap_mib"],
      "tasks within the caps": results["task_rise"] <= task_cap + 16,
      "nothing left afterwards": not left,
  }
  write_results(pathlib.Path(args.out), "sandbox_soak", results, report(results, limits))
  if not all(checks.values()):
    raise SystemExit(1)


if __name__ == "__main__":
  main()
