"""Supervised fine-tuning: token cross-entropy on completion tokens only.

An example is a prompt and a completion (token ids); the loss is
  -sum_{t in completion} log pi(x_t | x_<t) / #completion tokens
over the batch, so prompt tokens and padding get no gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from jaxscore.models import logprobs
from jaxscore.models import model as model_lib
from jaxscore.objectives import base, rl


@flax.struct.dataclass
class SFTBatch:
  tokens_BxT: jax.Array
  mask_BxT: jax.Array  # Real tokens (not padding).
  target_BxT: jax.Array  # Completion tokens: the ones the loss is over.


def sft_loss(params, batch: SFTBatch, rng, ref_params, *, cfg: model_lib.ModelConfig,
             aggregation: str = "token_mean"):
  del rng, ref_params
  logp_BxT, _ = logprobs.token_logprobs(params, batch.tokens_BxT, batch.mask_BxT, cfg)
  target = batch.target_BxT.astype(bool) & batch.mask_BxT.astype(bool)
  loss = rl.aggregate(-logp_BxT, target, aggregation)
  return loss, {"tokens/target": jnp.sum(target),
                "nll/token": rl.aggregate(-logp_BxT, target, "token_mean")}


def collate_completions(examples: Sequence[dict], width: int) -> SFTBatch:
  """Examples {"prompt": ids, "completion": ids} -> an SFTBatch of width T (numpy); a
  long example loses the start of its prompt first (`base.fit_to_width`)."""
  fitted = [base.fit_to_width(e["prompt"], [e["completion"]], width)[:2] for e in examples]
  rows = [prompt + completion for prompt, (completion,) in fitted]
  targets = [[0] * len(prompt) + [1] * len(completion) for prompt, (completion,) in fitted]
  tokens = base.pad_rows(rows, width)
  mask = base.pad_rows([[1] * len(r) for r in rows], width, dtype=bool)
  return SFTBatch(tokens_BxT=tokens, mask_BxT=mask,
                  target_BxT=base.pad_rows(targets, width, dtype=bool))


def completion_ids(fmt, tokenizer, text: str) -> list[int]:
  """A gold reply as the sampler would end it: the format's end of turn, or EOS for
  plain concatenation, so the model learns to stop."""
  ids = fmt.attempt_ids(text)
  if fmt.end_of_turn_id is None and tokenizer.eos_token_id is not None:
    ids = ids + [tokenizer.eos_token_id]
  return ids


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  aggregation: str = "token_mean"  # token_mean | sequence_mean | sum


@base.register("sft")
class SFT(base.OfflineObjective):
  """Fine-tunes on the task's gold solutions (or any prompt/completion examples)."""

  title = "SFT"
  Config = SFTConfig

  def examples(self, setup, problems):
    missing = [p.id for p in problems if not p.solution]
    if missing:
      raise ValueError(f"sft needs gold solutions, but problem {missing[0]} of task "
                       f"{setup.task.name!r} has none ({len(missing)} of {len(problems)})")
    return [{"id": p.id, "prompt": setup.fmt.prompt_ids(p.prompt),
             "completion": completion_ids(setup.fmt, setup.tokenizer, p.solution)}
            for p in problems]

  def collate(self, examples, width):
    return collate_completions(examples, width)

  def batch_weight(self, batch: SFTBatch) -> jax.Array:
    target = batch.target_BxT.astype(bool) & batch.mask_BxT.astype(bool)
    return rl.aggregation_weight(target, self.config.aggregation)

  def loss_fn(self, params, batch, rng, ref_params):
    return sft_loss(params, batch, rng, ref_params, cfg=self.ctx.model_cfg,
                    aggregation=self.config.aggregation)

