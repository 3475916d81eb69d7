"""Experiment configs built from the dataclasses their groups feed.

Every config group (`c.optim`, `c.rollout`, `c.score`, ...) is the dataclass that the
code builds from it (`OptimConfig(**c.optim)`), so a default and its comment are written
once, on the dataclass. A config file states what it changes, as dotted keys:

  c = config.experiment()                      # every group at its defaults
  config.override(c, {"optim.learning_rate": 5e-6, "score.stages": "I:6,II:12"})

`experiment()` holds a group for every registered objective, so an objective registered
with `@objectives.register` is configurable (`--config.<name>.<field>`) without editing
a config file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from jaxscore import evaluate, objectives, tasks
from jaxscore.infra import distributed, sharding
from jaxscore.loops import common, offline, online, train
from jaxscore.models import pretrained
from jaxscore.sampling import sampler

# The groups of an RL experiment (configs/score.py, configs/study.py) and the dataclass
# each one is; objective groups are added from the registry.
GROUPS: dict[str, type] = {
    "model": pretrained.LoadConfig,
    "task": tasks.TaskConfig,
    "sampler": sampler.SamplingConfig,
    "rollout": online.RolloutConfig,
    "offline": offline.OfflineConfig,
    "optim": train.OptimConfig,
    "mesh": sharding.MeshConfig,
    "distributed": distributed.DistributedConfig,
    "checkpoint": common.CheckpointConfig,
    "log": common.LogConfig,
    "evaluate": evaluate.EvalConfig,
}


def defaults(cls: type) -> dict[str, Any]:
  """`cls`'s fields at their defaults, nested dataclasses as nested dicts."""
  out = {}
  for f in dataclasses.fields(cls):
    if f.default is not dataclasses.MISSING:
      value = f.default
    elif f.default_factory is not dataclasses.MISSING:
      value = f.default_factory()
    else:
      raise TypeError(f"{cls.__name__}.{f.name} has no default: it cannot be a config group")
    out[f.name] = defaults(type(value)) if dataclasses.is_dataclass(value) else value
  return out


def group(cls: type, **changes) -> ml_collections.ConfigDict:
  """The config group of dataclass `cls`: its defaults, with `changes`."""
  g = ml_collections.ConfigDict(defaults(cls))
  override(g, changes, where=cls.__name__)
  return g


def objective_groups(names: Sequence[str] | None = None) -> dict[str, type]:
  """The config group name and dataclass of each objective in `names` (default: every
  registered one)."""
  return {name: objectives.get(name).Config for name in names or objectives.names()}


def experiment(groups: Mapping[str, type] | None = None, objective: str | None = "score",
               objective_names: Sequence[str] | None = None, **extra: type
               ) -> ml_collections.ConfigDict:
  """A config with `seed`, `format`, `objective` (unless None) and one group per
  dataclass of `groups` (default: `GROUPS`) and of the objectives `objective_names`
  (default: every registered one), plus `extra` groups."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds sampling and data order and nothing else: runs are reproducible.
  if objective is not None:
    # The objective trained: a name in jaxscore.objectives, configured by its group.
    c.objective = objective
  c.format = "chat"  # chat (the tokenizer's chat template) | plain (concatenation)
  every = (dict(GROUPS if groups is None else groups) | objective_groups(objective_names)
           | dict(extra))
  for name, cls in every.items():
    c[name] = group(cls)
  return c


def override(c: ml_collections.ConfigDict, changes: Mapping[str, Any],
             where: str = "config") -> ml_collections.ConfigDict:
  """Sets each dotted key of `changes` in `c`; a key `c` lacks is an error naming it.
  Dict values become config dicts (a task's kwargs)."""
  for key, value in changes.items():
    *path, leaf = key.split(".")
    node = c
    for i, part in enumerate(path):
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise KeyError(f"{where}.{'.'.join(path[:i + 1])} is not a config group "
                       f"(setting {key})")
      node = node[part]
    if leaf not in node:
      raise KeyError(f"{where}.{key} is not a field (fields there: "
                     f"{', '.join(sorted(node.keys()))})")
    node[leaf] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
  return c


def variant_changes(arg: str, base: Mapping[str, Any], variants: Mapping[str, Mapping],
                    options: Mapping[str, Mapping]) -> dict[str, Any]:
  """The dotted-key changes of `arg` = `variant[,option...]` (a config file's argument):
  `base`, then the variant's, then each option's, later ones winning."""
  variant, *chosen = arg.split(",")
  if variant not in variants:
    raise ValueError(f"unknown variant {variant!r}: {', '.join(variants)}")
  out = dict(base) | dict(variants[variant])
  for option in chosen:
    if option not in options:
      raise ValueError(f"unknown option {option!r} ({', '.join(options)})")
    out |= options[option]
  return out


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dicts as one dict of dotted keys (a task's kwargs stay one value)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping) and k not in ("kwargs", "eval_kwargs"):
      out |= flatten(v, f"{prefix}{k}.")
    else:
      out[f"{prefix}{k}"] = v.to_dict() if hasattr(v, "to_dict") else v
  return out
