"""What an objective is, and the registry that maps config names to objectives.

An objective is one class, registered under the name a config selects it by
(`c.objective = "score"`). It carries:
  - `Config`, a frozen dataclass whose fields are exactly the fields of the config group
    named after the objective (`c.score`), built with `Config(**group)`;
  - `kind`: "online" (trained on its own rollouts: rollout -> score -> batch -> update),
    "offline" (trained on a fixed dataset: dataset -> batch -> update) or
    "self_training" (offline on examples kept from its own samples, round by round);
  - how it turns rollouts (online) or dataset examples (offline) into a batch;
  - `loss_fn(params, batch, rng, ref_params) -> (loss, metrics)` for
    `loops.train.make_train_step`.
The loops call these and nothing else, so a new method is one new file plus its
`@register` line; no loop names a method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxscore.models import model as model_lib
from jaxscore.sampling import sampler as sampler_lib

_REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
  """Class decorator: makes an objective selectable by `c.objective = name`."""

  def add(cls: type) -> type:
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(f"objective {name!r} is already registered ({_REGISTRY[name]})")
    cls.name = name
    _REGISTRY[name] = cls
    return cls

  return add


def names() -> list[str]:
  return sorted(_REGISTRY)


def get(name: str) -> type:
  if name not in _REGISTRY:
    raise ValueError(f"objective={name!r}: expected one of {', '.join(names())}")
  return _REGISTRY[name]


def make_config(cls: type, fields: Mapping[str, Any], where: str):
  """`cls.Config(**fields)`, with an error that names the config key on a bad field."""
  known = {f.name for f in dataclasses.fields(cls.Config)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"config {where}.{unknown[0]} is not a field of {cls.__name__}."
                     f"Config (fields: {', '.join(sorted(known))})")
  return cls.Config(**fields)


@dataclasses.dataclass(frozen=True)
class Context:
  """What the loop knows that an objective may need."""

  model_cfg: model_lib.ModelConfig
  num_turns: int = 1  # Turns per episode (online).
  group_size: int = 1  # Samples per prompt, contiguous in the batch (online).
  sampling: sampler_lib.SamplingConfig | None = None  # How training rollouts sample.
  # The feedback between turns stops a row at its first correct answer (online), so
  # some rows take fewer turns (`Trajectories.turns_BxN`).
  stops_rows: bool = False


def make(name: str, fields: Mapping[str, Any], ctx: Context):
  """The objective `name` with its config built from `fields` (config group `name`)."""
  cls = get(name)
  fields = fields.to_dict() if hasattr(fields, "to_dict") else dict(fields)
  return cls(make_config(cls, fields, where=name), ctx)


@flax.struct.dataclass
class Trajectories:
  """Rollouts as an online objective receives them; per-token arrays are B x T, cut or
  padded to the batch width.

  Rows hold G samples per prompt contiguously; N counts turns.
  """

  tokens_BxT: jax.Array
  mask_BxT: jax.Array  # Real tokens (not padding).
  turn_BxT: jax.Array  # t > 0: sampled in turn t; 0: prompt, messages, padding.
  behaviour_logp_BxT: jax.Array  # log pi_old of sampled tokens (the sampler's model).
  ref_logp_BxT: jax.Array | None  # Reference log-probs, if the objective asked for them.
  rewards_BxN: jax.Array  # 0/1 reward of each turn (0 on turns not taken).
  turns_BxN: jax.Array  # bool: the row took this turn (feedback rollouts stop early).


class Objective:
  """Base class: the attributes every objective has."""

  name: ClassVar[str]  # Set by `register`.
  title: ClassVar[str]  # Shown in progress bars and report tables.
  kind: ClassVar[str]  # "online" | "offline" | "self_training"
  Config: ClassVar[type]

  def __init__(self, config, ctx: Context):
    self.config, self.ctx = config, ctx

  @property
  def updates_per_batch(self) -> tuple[int, int]:
    """(epochs, minibatches): optimizer updates the train step makes on each batch."""
    return 1, 1

  def batch_weight(self, batch) -> jax.Array:
    """What a slice of a batch counts in the mean the loss takes over the batch, so
    that gradients accumulated over slices (`optim.micro_batches`) are the batch's: its
    rows here; objectives whose loss is a mean over tokens count those."""
    return jnp.float32(jax.tree.leaves(batch)[0].shape[0])

  def loss_fn(self, params, batch, rng, ref_params):
    raise NotImplementedError


class OnlineObjective(Objective):
  """Trained on its own rollouts."""

  kind = "online"
  # True: the loop computes reference log-probs of every rollout (`Trajectories`).
  uses_reference: ClassVar[bool] = True
  # True: `behaviour_logp_BxT` is recomputed by teacher forcing under the params that
  # sampled, before any update (so a clipped ratio starts at exactly 1); False: the
  # sampler's own log-probs (the same policy, cached decode).
  recompute_behaviour_logp: ClassVar[bool] = False
  # True: the loss corrects for samples of older parameters (a ratio against the
  # behaviour log-probs), so the loop may sample a step ahead (`rollout.off_policy_steps`).
  corrects_off_policy: ClassVar[bool] = False

  @property
  def num_steps(self) -> int:
    return self.config.num_steps

  def phase(self, step: int) -> str | None:
    """A label for `step` (e.g. SCoRe's stage), logged and saved with checkpoints."""
    del step
    return None

  def make_batch(self, traj: Trajectories, step: int) -> tuple[Any, dict[str, Any]]:
    """(batch for `loss_fn`, host metrics of the batch such as returns)."""
    raise NotImplementedError


class OfflineObjective(Objective):
  """Trained on a fixed dataset of examples (dicts of token lists)."""

  kind = "offline"

  def examples(self, setup, problems: Sequence[Any]) -> list[dict[str, Any]]:
    """Training examples built from a task's problems (e.g. gold solutions)."""
    raise NotImplementedError

  def length(self, example: dict[str, Any]) -> int:
    """Tokens the example needs in a batch row."""
    return len(example["prompt"]) + len(example["completion"])

  def prepare(self, examples: list[dict[str, Any]], ref_params, width: int) -> list[dict]:
    """Examples ready for `collate` (e.g. with reference log-probs computed once)."""
    del ref_params, width
    return examples

  def collate(self, examples: Sequence[dict[str, Any]], width: int) -> Any:
    """A batch of `examples` padded (or cut) to `width` tokens: numpy arrays."""
    raise NotImplementedError


def pad_rows(rows: Sequence[Sequence[Any]], width: int, value=0, dtype=np.int32) -> np.ndarray:
  """Rows right-padded (or cut) to `width`: B x T."""
  out = np.full((len(rows), width), value, dtype)
  for i, row in enumerate(rows):
    row = list(row)[:width]
    out[i, :len(row)] = row
  return out


def fit_to_width(prompt: Sequence[int], completions: Sequence[Sequence[int]], width: int
                 ) -> tuple[list[int], list[list[int]], bool, bool]:
  """(prompt, completions, prompt_trimmed, completion_cut): one prompt and the
  completions that follow it (DPO's chosen and rejected) fitted into `width` tokens.

  The prompt loses tokens from the left first, down to half the width: its start is the
  context furthest from what is learned, while a completion's end holds its answer and
  its end of turn. Only a completion longer than what is then left is cut at the end.
  Every completion sees the same (trimmed) prompt.
  """
  prompt, completions = list(prompt), [list(c) for c in completions]
  longest = max(map(len, completions), default=0)
  if len(prompt) + longest <= width:
    return prompt, completions, False, False
  keep = max(width - longest, min(len(prompt), width // 2))
  trimmed = prompt[len(prompt) - keep:]
  room = width - len(trimmed)
  return (trimmed, [c[:room] for c in completions], keep < len(prompt),
          any(len(c) > room for c in completions))
