"""Direct preference optimisation on (prompt, chosen, rejected) completions.

  loss = -log sigmoid(beta * [(log pi(c|s) - log pi_ref(c|s)) - (log pi(r|s) - log pi_ref(r|s))])

with log-probs summed over the completion tokens only (prompt tokens are context, never
targets). The reference log-probs are computed once, before training (`prepare`), and
travel with the examples, so the reference model is not run during training. Self-Explore
trains this on step-level pairs, outcome DPO on whole-rationale pairs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxscore.models import logprobs
from jaxscore.models import model as model_lib
from jaxscore.objectives import base, sft
from jaxscore.sampling import sampler as sampler_lib


@flax.struct.dataclass
class DPOBatch:
  """Chosen rows then rejected rows of the same prompts: 2B x T, and B reference sums."""

  tokens_2BxT: jax.Array
  mask_2BxT: jax.Array
  target_2BxT: jax.Array  # Completion tokens.
  ref_logp_2B: jax.Array  # Reference log pi(completion | prompt), summed.


def sequence_logprobs(params, tokens_BxT, mask_BxT, target_BxT, cfg: model_lib.ModelConfig):
  """sum over completion tokens of log pi(token | prefix): B, in float32."""
  logp_BxT, _ = logprobs.token_logprobs(params, tokens_BxT, mask_BxT, cfg)
  target = target_BxT.astype(bool) & mask_BxT.astype(bool)
  return jnp.sum(jnp.where(target, logp_BxT, 0.0), axis=1)


def preference_loss(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, beta):
  """-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) on sequence log-probs."""
  margin = (policy_chosen_B - ref_chosen_B) - (policy_rejected_B - ref_rejected_B)
  return -jax.nn.log_sigmoid(beta * margin)


def dpo_loss(params, batch: DPOBatch, rng, ref_params, *, cfg: model_lib.ModelConfig,
             beta: float):
  """The DPO objective's loss on a batch, with the reference's sums taken from it."""
  del rng, ref_params
  logp_2B = sequence_logprobs(params, batch.tokens_2BxT, batch.mask_2BxT, batch.target_2BxT,
                              cfg)
  b = logp_2B.shape[0] // 2
  chosen, rejected = logp_2B[:b], logp_2B[b:]
  ref_chosen, ref_rejected = batch.ref_logp_2B[:b], batch.ref_logp_2B[b:]
  loss_B = preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
  reward_chosen = beta * (chosen - ref_chosen)
  reward_rejected = beta * (rejected - ref_rejected)
  return jnp.mean(loss_B), {
      "dpo/reward_chosen": jnp.mean(reward_chosen),
      "dpo/reward_rejected": jnp.mean(reward_rejected),
      "dpo/margin": jnp.mean(reward_chosen - reward_rejected),
      "dpo/accuracy": jnp.mean((reward_chosen > reward_rejected).astype(jnp.float32))}


def collate_pairs(examples: Sequence[dict], width: int, with_reference: bool = True) -> DPOBatch:
  """Examples {"prompt", "chosen", "rejected": ids, "ref_chosen", "ref_rejected": float}
  -> a DPOBatch of width T (numpy)."""
  # Chosen and rejected keep the same context: the pair is fitted as one.
  fitted = [base.fit_to_width(e["prompt"], [e["chosen"], e["rejected"]], width)[:2]
            for e in examples]
  rows = [{"prompt": prompt, "completion": completions[side]}
          for side in (0, 1) for prompt, completions in fitted]
  b = sft.collate_completions(rows, width)
  ref = (np.array([e["ref_" + side] for side in ("chosen", "rejected") for e in examples],
                  np.float32) if with_reference else np.zeros((len(rows),), np.float32))
  return DPOBatch(tokens_2BxT=b.tokens_BxT, mask_2BxT=b.mask_BxT, target_2BxT=b.target_BxT,
                  ref_logp_2B=ref)


def reference_logprobs(examples: Sequence[dict], ref_params, cfg: model_lib.ModelConfig,
                       width: int, batch_size: int = 16) -> list[dict]:
  """The examples with `ref_chosen` and `ref_rejected` added, computed in fixed-size
  batches (one compile); examples that already have them are kept as they are."""
  todo = [i for i, e in enumerate(examples) if "ref_chosen" not in e]
  if not todo:
    return list(examples)
  score = jax.jit(lambda p, t, m, g: sequence_logprobs(p, t, m, g, cfg))
  out = [dict(e) for e in examples]
  for start, chunk, real in sampler_lib.padded_chunks([examples[i] for i in todo],
                                                       batch_size):
    idx = todo[start:start + real]
    b = collate_pairs(chunk, width, with_reference=False)
    logp_2B = np.asarray(score(ref_params, b.tokens_2BxT, b.mask_2BxT, b.target_2BxT))
    for j, i in enumerate(idx):
      out[i]["ref_chosen"] = float(logp_2B[j])
      out[i]["ref_rejected"] = float(logp_2B[batch_size + j])
  return out


def truncation_counts(examples: Sequence[dict], width: int) -> dict[str, int]:
  """How many pairs lose the start of their prompt, and how many a completion's end,
  at `width` tokens."""
  fits = [base.fit_to_width(e["prompt"], [e["chosen"], e["rejected"]], width)
          for e in examples]
  return {"prompt_trimmed": sum(f[2] for f in fits),
          "completion_cut": sum(f[3] for f in fits)}


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  beta: float = 0.1  # Self-Explore: 0.1.


@base.register("dpo")
class DPO(base.OfflineObjective):
  """Preference pairs; examples come from a preference dataset (e.g. Self-Explore's)."""

  title = "DPO"
  Config = DPOConfig

  def length(self, example: dict) -> int:
    return len(example["prompt"]) + max(len(example["chosen"]), len(example["rejected"]))

  def prepare(self, examples, ref_params, width):
    return reference_logprobs(examples, ref_params, self.ctx.model_cfg, width)

  def collate(self, examples, width):
    return collate_pairs(examples, width)

  def loss_fn(self, params, batch, rng, ref_params):
    return dpo_loss(params, batch, rng, ref_params, cfg=self.ctx.model_cfg,
                    beta=self.config.beta)
