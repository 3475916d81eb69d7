"""Sharded execution on 8 fake CPU devices (a subprocess: the device count is fixed at
JAX start-up)."""

import os
import pathlib
import subprocess
import sys
import types

import jax
import pytest
from conftest import require_embedded

from jaxscore.infra import sharding
from jaxscore.models import model as model_lib


def _run_on_8_devices(script: str) -> str:
  """The stdout of tests/`script`, run on 8 fake CPU devices; fails the test if it fails."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, str(pathlib.Path(__file__).with_name(script))],
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  return out.stdout


def test_meshes_match_one_device_and_rules():
  stdout = _run_on_8_devices("sharded_check.py")
  for mesh in ("(8, 1, 1)", "(1, 8, 1)", "(2, 2, 2)", "(1, 2, 2, 2)"):
    assert f"OK mesh={mesh}" in stdout
  assert stdout.count("OK error") == 3


def test_a_run_loads_onto_its_mesh_and_samples_with_rows_split_over_it():
  require_embedded()  # The load; the tiny model's evaluation uses its tokenizer.
  stdout = _run_on_8_devices("sharded_eval_check.py")
  for part in ("load", "qlora load", "evaluate", "self-training", "pass@k"):
    assert f"OK {part}" in stdout


def test_rules_map_logical_axes():
  cfg = model_lib.ModelConfig(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4,
                              num_kv_heads=2, mlp_dim=64)
  rules = sharding.RULES["fsdp_tp"]
  assert sharding.spec(("layers", "embed", "heads", "head_dim"), rules) == \
      jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert sharding.spec(("activation_batch", "activation_length", "activation_embed"),
                       rules) == jax.sharding.PartitionSpec(("dcn", "data", "fsdp"), None, None)
  mesh = sharding.make_mesh(1, 1, 1)
  assert jax.tree.structure(sharding.param_shardings(cfg, mesh, rules)) == \
      jax.tree.structure(model_lib.init(cfg, jax.random.key(0)))
  with pytest.raises(sharding.ShardingError, match="needs 2 devices"):
    sharding.make_mesh(2, 1, 1)


def test_slices_follow_slice_index_then_process_then_order():
  dev = lambda i, s, p: types.SimpleNamespace(id=i, slice_index=s, process_index=p)
  # Two slices of two hosts each, listed out of order.
  devs = [dev(i, s, p) for i, (s, p) in enumerate([(1, 2), (0, 0), (1, 3), (0, 1)])]
  assert [[d.id for d in g] for g in sharding._slices(devs, 2)] == [[1, 3], [0, 2]]
  with pytest.raises(sharding.ShardingError, match="span 2 slices: set mesh.dcn=2"):
    sharding._slices(devs, 1)
  # GPU hosts (no slice_index): one slice per process.
  gpus = [types.SimpleNamespace(id=i, process_index=i % 2) for i in range(4)]
  assert [[d.id for d in g] for g in sharding._slices(gpus, 2)] == [[0, 2], [1, 3]]
  # One process's fake devices: consecutive runs.
  fake = [types.SimpleNamespace(id=i) for i in range(4)]
  assert [[d.id for d in g] for g in sharding._slices(fake, 2)] == [[0, 1], [2, 3]]
  with pytest.raises(sharding.ShardingError, match="mesh.dcn=3 slices do not divide 1"):
    sharding.make_mesh(dcn=3)
