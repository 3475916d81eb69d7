"""Sharded execution on 8 fake CPU devices (a subprocess: the device count is fixed at
JAX start-up)."""

import os
import pathlib
import subprocess
import sys

import jax
import pytest

from jaxscore.infra import sharding
from jaxscore.models import model as model_lib


def test_meshes_match_one_device_and_rules():
  script = pathlib.Path(__file__).with_name("sharded_check.py")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  for mesh in ("(8, 1, 1)", "(1, 8, 1)", "(2, 2, 2)"):
    assert f"OK mesh={mesh}" in out.stdout
  assert out.stdout.count("OK error") == 3


def test_rules_map_logical_axes():
  cfg = model_lib.ModelConfig(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4,
                              num_kv_heads=2, mlp_dim=64)
  rules = sharding.RULES["fsdp_tp"]
  assert sharding.spec(("layers", "embed", "heads", "head_dim"), rules) == \
      jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert sharding.spec(("activation_batch", "activation_length", "activation_embed"),
                       rules) == jax.sharding.PartitionSpec(("data", "fsdp"), None, None)
  mesh = sharding.make_mesh(1, 1, 1)
  assert jax.tree.structure(sharding.param_shardings(cfg, mesh, rules)) == \
      jax.tree.structure(model_lib.init(cfg, jax.random.key(0)))
  with pytest.raises(sharding.ShardingError, match="needs 2 devices"):
    sharding.make_mesh(2, 1, 1)
