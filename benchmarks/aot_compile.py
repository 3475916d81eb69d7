"""Ahead-of-time compile of the sharded SCoRe train step for a TPU slice, from a CPU host.

  pip install libtpu        # TPU compiler only; no TPU needed
  python benchmarks/aot_compile.py --topology=v5e:2x4 --model=gemma3-4b --mesh=1,8,1
  python benchmarks/aot_compile.py --topology=v4:2x2x1 --model=qwen3-8b --mesh=1,4,1

Compiles `train_step` with every parameter, optimizer state and batch array sharded by
the rules, and reports per-device memory from XLA's memory analysis. Without libtpu it
compiles for a fake CPU mesh with the same number of devices instead (--fallback_cpu),
which checks the sharding but not TPU memory. Appends a row to `aot_compile.md`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time


def memory_gib(compiled) -> dict:
  """Per-device memory of a compiled step, from XLA's memory analysis, in GiB."""
  mem = compiled.memory_analysis()
  gib = lambda x: x / 2**30
  return dict(argument_gib=gib(mem.argument_size_in_bytes),
              output_gib=gib(mem.output_size_in_bytes), temp_gib=gib(mem.temp_size_in_bytes),
              alias_gib=gib(mem.alias_size_in_bytes),
              total_per_device_gib=gib(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                       + mem.temp_size_in_bytes - mem.alias_size_in_bytes))


def append_row(out: pathlib.Path, result: dict, target: str, sizes, args) -> None:
  """Appends one compile's row to `aot_compile.md` (writing the header first)."""
  out.mkdir(parents=True, exist_ok=True)
  md = out / "aot_compile.md"
  if not md.exists():
    md.write_text(
        "# Ahead-of-time compile of the sharded train step (benchmarks/aot_compile.py)\n\n"
        "bfloat16 params and compute, Adam state, SCoRe policy-gradient loss; per-device "
        "memory from XLA's memory analysis (arguments + outputs + temporaries - aliased).\n\n"
        "| target | model | params (B) | mesh (data, fsdp, tensor) | rules | batch x seq "
        "| remat | logits chunk | per-device GiB | temp GiB | compile s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n")
  with open(md, "a") as f:
    f.write(f"| {target} | {args.model} | {result['params_b']:.2f} | "
            f"{tuple(sizes)} | {args.rules} | {args.batch} x {args.seq} | {args.remat} | "
            f"{args.logits_chunk or 'none'} | {result['total_per_device_gib']:.2f} | "
            f"{result['temp_gib']:.2f} | "
            f"{result['compile_s']} |\n")


def parse_args():
  parser = argparse.ArgumentParser()
  parser.add_argument("--topology", default="v5e:4x4",
                      help="e.g. v5e:4x4 (v5e-16), v4:2x2x4 (v4-32)")
  parser.add_argument("--model", default="gemma3-4b",
                      help="a named shape of jaxscore.models.shapes (gemma3-1b, gemma3-4b, "
                      "gemma3-12b, qwen3-0.6b, qwen3-8b, llama3.1-8b)")
  parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor (-1: the rest)")
  parser.add_argument("--rules", default="fsdp_tp")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--remat", default="none", help="none | full | dots (ModelConfig.remat)")
  parser.add_argument("--logits_chunk", type=int, default=0,
                      help="positions per log-prob chunk (ModelConfig.logits_chunk; 0: all)")
  parser.add_argument("--fallback_cpu", type=int, default=0,
                      help="device count of a fake CPU mesh to use when libtpu is missing")
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
  return parser.parse_args()


def target_mesh(args):
  """(mesh, target name, mesh sizes) over the TPU topology's devices (or fake CPUs)."""
  import jax
  import numpy as np
  from jax.sharding import AxisType, Mesh

  from jaxscore.infra import sharding

  if args.fallback_cpu:
    devices, target = jax.devices(), f"fake CPU mesh of {args.fallback_cpu} devices"
  else:
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="tpu", topology_name=args.topology)
    devices, target = topo.devices, f"{args.topology} ({topo.devices[0].device_kind})"
  sizes = [int(s) for s in args.mesh.split(",")]
  if -1 in sizes:
    sizes[sizes.index(-1)] = len(devices) // int(np.prod([s for s in sizes if s != -1]))
  if int(np.prod(sizes)) != len(devices):
    raise sharding.ShardingError(f"mesh {sizes} does not use the {len(devices)} devices")
  mesh = Mesh(np.array(devices).reshape(sizes), sharding.MESH_AXES,
              axis_types=(AxisType.Auto,) * 3)
  return mesh, target, sizes


def main():
  args = parse_args()
  if args.fallback_cpu:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.fallback_cpu}"

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec

  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from jaxscore.infra import sharding
  from jaxscore.loops import train as train_lib
  from jaxscore.models import model as model_lib
  from jaxscore.models import shapes as shapes_lib
  from jaxscore.objectives import policy_gradient as pg

  mesh, target, sizes = target_mesh(args)
  rules = sharding.RULES[args.rules]
  cfg = shapes_lib.config(args.model, param_dtype="bfloat16", dtype="bfloat16", remat=args.remat,
                      logits_chunk=args.logits_chunk)

  param_sh = sharding.param_shardings(cfg, mesh, rules)
  shapes = jax.eval_shape(functools.partial(model_lib.init, cfg), jax.random.key(0))
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, param_sh)
  opt = train_lib.make_optimizer(train_lib.OptimConfig())
  key = jax.random.key(0)  # Made here on the host; only its type reaches the compiler.
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, PartitionSpec()))
  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       jax.eval_shape(lambda p: train_lib.TrainState.create(p, opt), params),
                       train_lib.state_shardings(opt, params, param_sh, mesh))
  with sharding.activate(mesh, rules):
    rows = NamedSharding(mesh, PartitionSpec(dict(rules)["batch"]))
    bl = lambda dt: jax.ShapeDtypeStruct((args.batch, args.seq), dt, sharding=rows)
    batch = pg.RLBatch(tokens_BxT=bl(jnp.int32), mask_BxT=bl(jnp.bool_),
                              turn_BxT=bl(jnp.int32), advantages_BxT=bl(jnp.float32),
                              kl_coef_BxT=bl(jnp.float32), ref_logp_BxT=bl(jnp.float32),
                              old_logp_BxT=bl(jnp.float32))
    loss_fn = lambda *a: pg.policy_gradient_loss(*a, cfg=cfg, loss_cfg=pg.PolicyLossConfig())
    step = jax.jit(train_lib.make_train_step(loss_fn, opt), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, rng).compile()
    seconds = time.perf_counter() - t0
  result = dict(target=target, model=args.model, mesh=dict(zip(sharding.MESH_AXES, sizes)),
                rules=args.rules, batch=args.batch, seq=args.seq, remat=args.remat,
                logits_chunk=args.logits_chunk, compile_s=round(seconds, 1),
                params_b=sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) / 1e9,
                **memory_gib(compiled))
  print(json.dumps(result, indent=1))
  append_row(pathlib.Path(args.out), result, target, sizes, args)


if __name__ == "__main__":
  main()
