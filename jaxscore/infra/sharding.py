"""Device meshes and the rules that map logical axis names to mesh axes.

The model names every parameter, cache and large-activation axis (see
`model.param_axes`, `model.cache_axes`, `model.ACT_EMBED`); a topology is a small rules
table from those names to the mesh axes `dcn`, `data`, `fsdp` and `tensor`. `dcn` spans
slices (TPU slices joined by the data-center network, or hosts without a fast
interconnect): the batch is split over it and the weights are not, so the only traffic
across it is the gradients' all-reduce; the other three axes live inside each slice:

  mesh = make_mesh(data=2, fsdp=2, tensor=2)           # one slice
  mesh = make_mesh(data=1, fsdp=-1, tensor=1, dcn=2)   # two slices, fsdp inside each
  with activate(mesh, RULES["fsdp_tp"]):
    params = init_sharded(cfg, rng, mesh, RULES["fsdp_tp"])    # created in place
    state, metrics = jax.jit(train_step)(state, shard_batch(batch, mesh, rules), rng)

Outside `activate`, the model's constraints are no-ops and everything runs on one device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxscore import errors
from jaxscore.models import lora
from jaxscore.models import model as model_lib

MESH_AXES = ("dcn", "data", "fsdp", "tensor")
Rules = tuple[tuple[str, Any], ...]

_BATCH = ("dcn", "data", "fsdp")
RULES: dict[str, Rules] = {
    # Replicated weights, batch split over every device.
    "data_parallel": (
        ("activation_batch", _BATCH), ("cache_batch", _BATCH), ("batch", _BATCH)),
    # Weights split over fsdp along `embed`; gathered per layer by XLA.
    "fsdp": (
        ("activation_batch", _BATCH), ("cache_batch", _BATCH), ("batch", _BATCH),
        ("embed", "fsdp")),
    # fsdp plus Megatron-style tensor parallelism of heads, mlp and vocab.
    "fsdp_tp": (
        ("activation_batch", _BATCH), ("cache_batch", _BATCH), ("batch", _BATCH),
        ("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"),
        ("cache_kv_heads", "tensor"), ("mlp", "tensor"), ("activation_mlp", "tensor"),
        ("vocab", "tensor")),
}


ShardingError = errors.ShardingError


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The device mesh and its layout: an experiment config's `mesh` group."""

  dcn: int = 1  # Slices (data-parallel across them over DCN); the axes below are per slice.
  data: int = -1  # Devices along each mesh axis within a slice; -1 takes the rest.
  fsdp: int = 1
  tensor: int = 1
  rules: str = "data_parallel"  # A name in RULES: data_parallel | fsdp | fsdp_tp
  # > 0: the last N devices sample, data-parallel over them with the weights whole on
  # each, and the mesh above trains on the others (rollout.off_policy_steps=1: new
  # weights go device to device after each update); 0: every device does both.
  sampler_devices: int = 0


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, dcn: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (dcn, data, fsdp, tensor) mesh: `dcn` slices of (data, fsdp, tensor) devices each.

  One of data, fsdp, tensor may be -1 to take the rest of a slice's devices. Slices are
  the devices' `slice_index` (multi-slice TPU), else their processes when there are `dcn`
  of them, else `dcn` equal runs of consecutive devices (fake CPU devices).
  """
  devices = list(devices if devices is not None else jax.devices())
  if dcn < 1 or len(devices) % dcn:
    raise ShardingError(f"mesh.dcn={dcn} slices do not divide {len(devices)} devices")
  slices = _slices(devices, dcn)
  per_slice = len(slices[0])
  sizes = [data, fsdp, tensor]
  shown = lambda: dict(zip(MESH_AXES, [dcn, *sizes]))
  if sizes.count(-1) > 1:
    raise ShardingError("at most one mesh axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if per_slice % known:
      raise ShardingError(f"mesh {shown()} does not divide the {per_slice} devices of "
                          f"each of {dcn} slice(s)")
    sizes[sizes.index(-1)] = per_slice // known
  if math.prod(sizes) != per_slice:
    raise ShardingError(f"mesh {shown()} needs {dcn * math.prod(sizes)} devices, but "
                        f"there are {len(devices)} ({dcn} slice(s) of {per_slice})")
  grid = np.stack([_slice_grid(s, sizes) for s in slices])
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _slices(devices: list[jax.Device], dcn: int) -> list[list[jax.Device]]:
  for key in ("slice_index", "process_index"):
    groups: dict[int, list[jax.Device]] = {}
    for d in devices:
      groups.setdefault(getattr(d, key, 0), []).append(d)
    if len(groups) == dcn and len({len(g) for g in groups.values()}) == 1:
      return [groups[k] for k in sorted(groups)]
    if key == "slice_index" and len(groups) > 1:
      raise ShardingError(f"mesh.dcn={dcn}, but the devices span {len(groups)} slices: "
                          f"set mesh.dcn={len(groups)}")
  n = len(devices) // dcn
  return [devices[i * n:(i + 1) * n] for i in range(dcn)]


def _slice_grid(devices: list[jax.Device], sizes: list[int]) -> np.ndarray:
  """Devices of one slice as a (data, fsdp, tensor) array laid out on the interconnect."""
  for split_physical_axes in (False, True):  # Splitting a torus axis only if need be.
    try:
      return mesh_utils.create_device_mesh(
          sizes, devices, allow_split_physical_axes=split_physical_axes)
    except (AssertionError, NotImplementedError, ValueError):
      pass
  # A described topology whose chips' cores are separate devices (v4 without megacore,
  # as libtpu describes v4 slices for ahead-of-time compiles): the devices in order.
  return np.array(devices).reshape(sizes)


def training_mesh(m: MeshConfig) -> tuple[Mesh, Rules]:
  """(mesh, rules) of a run's `mesh` group: every device, or those
  `m.sampler_devices` leaves."""
  devices = jax.devices()
  if m.sampler_devices:
    if m.sampler_devices >= len(devices):
      raise ShardingError(f"mesh.sampler_devices={m.sampler_devices} leaves none of the "
                          f"{len(devices)} devices to train on")
    devices = devices[:len(devices) - m.sampler_devices]
  return make_mesh(m.data, m.fsdp, m.tensor, m.dcn, devices=devices), RULES[m.rules]


def rows_sharding(params: Any, rules: Rules) -> NamedSharding | None:
  """Rows split over the batch axes of the mesh `params` live on; None when they live
  on one device."""
  mesh = getattr(jax.tree.leaves(params)[0].sharding, "mesh", None)
  if not isinstance(mesh, Mesh) or mesh.size == 1:
    return None
  return NamedSharding(mesh, PartitionSpec(dict(rules)["batch"]))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules):
  """Makes the model's logical constraints shard over `mesh` by `rules`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


def spec(axes: Sequence[str], rules: Rules) -> PartitionSpec:
  return nn.logical_to_mesh_axes(tuple(axes), rules)


def shardings(axes_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a pytree of logical-axis tuples."""
  return jax.tree.map(lambda a: NamedSharding(mesh, spec(a, rules)), axes_tree,
                      is_leaf=_is_axes)


def check_divisible(shapes_tree: Any, axes_tree: Any, mesh: Mesh, rules: Rules) -> None:
  """Raises ShardingError naming the first dimension a mesh axis does not divide."""
  flat_axes = jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=_is_axes)[0]
  flat_shapes = jax.tree.leaves(shapes_tree, is_leaf=lambda x: isinstance(x, tuple))
  for (path, axes), shape in zip(flat_axes, flat_shapes):
    for dim, (name, mesh_axes) in enumerate(zip(axes, spec(axes, rules))):
      if mesh_axes is None:
        continue
      mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
      size = math.prod(mesh.shape[a] for a in mesh_axes)
      if shape[dim] % size:
        raise ShardingError(
            f"{jax.tree_util.keystr(path)}: dimension {dim} ({name}={shape[dim]}) is not "
            f"divisible by mesh axes {mesh_axes} of size {size}")


def param_shardings(cfg: model_lib.ModelConfig, mesh: Mesh, rules: Rules) -> Any:
  """Shardings of every parameter, after checking each sharded dimension divides (a
  QArray of shardings for each projection QLoRA stores quantized)."""
  axes, shapes = model_lib.param_axes(cfg), model_lib.param_shapes(cfg)
  check_divisible(shapes, axes, mesh, rules)
  return lora.quantized_shardings(shardings(axes, mesh, rules), shapes, cfg)


def frozen_base(base: Any, cfg: model_lib.ModelConfig, mesh: Mesh, rules: Rules) -> Any:
  """A LoRA model's frozen base (no adapters) in its shardings, its projections stored as
  QLoRA says: quantized on the devices from full precision laid out the same way, so no
  device ever holds more than its share of the full-precision base (a base already
  quantized is only placed)."""
  base_sh = lora.split(param_shardings(cfg, mesh, rules))[0]
  if cfg.quantize == "none" or any(map(lora.is_quantized, base["layers"].values())):
    return jax.device_put(base, base_sh)
  full = cfg.replace(lora=dataclasses.replace(cfg.lora, quantize="none"))
  full_sh = lora.split(param_shardings(full, mesh, rules))[0]
  return jax.jit(functools.partial(lora.quantize_base, cfg=cfg),
                 out_shardings=base_sh)(jax.device_put(base, full_sh))


def init_sharded(cfg: model_lib.ModelConfig, rng: jax.Array, mesh: Mesh, rules: Rules,
                 stddev: float = 0.02) -> Any:
  """Random params created directly in their shardings (no full host copy)."""
  out = param_shardings(cfg, mesh, rules)
  return jax.jit(functools.partial(model_lib.init, cfg, stddev=stddev), out_shardings=out)(rng)


def shard_batch(batch: Any, mesh: Mesh, rules: Rules) -> Any:
  """Splits every array of a batch along its leading (batch) axis."""
  batch_axes = dict(rules).get("batch")
  sharding = NamedSharding(mesh, PartitionSpec(batch_axes))
  size = math.prod(mesh.shape[a] for a in ((batch_axes,) if isinstance(batch_axes, str)
                                           else batch_axes or ()))

  def put(x):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    if x.ndim == 0:
      return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
    if x.shape[0] % size:
      raise ShardingError(f"batch dimension {x.shape[0]} is not divisible by the "
                          f"{size} devices of mesh axes {batch_axes}")
    return jax.device_put(x, sharding)

  return jax.tree.map(put, batch)


def to_host(x: Any) -> np.ndarray:
  """A numpy copy of a whole array, gathering shards held by other processes."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def process_rows(num_rows: int) -> tuple[int, int]:
  """[start, stop) of the rows this process owns (contiguous blocks in process order)."""
  n, i = jax.process_count(), jax.process_index()
  if num_rows % n:
    raise ShardingError(f"{num_rows} rows do not split over {n} processes")
  return i * num_rows // n, (i + 1) * num_rows // n


def gather_rows(local: np.ndarray) -> np.ndarray:
  """Concatenates every process's rows, in process order."""
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(local, tiled=True))
