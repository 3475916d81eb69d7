"""The self-training loop: sample -> keep -> fine-tune, for a `self_training` objective
(jaxscore.objectives.self_training: STaR, Pair-SFT).

Each round samples `group_size` episodes per problem of the objective's `turns`
attempts, the task's instruction between them (correctness never revealed), from the
next problems of the online loop's seeded order (so a comparison with RL trains on the
same problems in the same order); the objective keeps what it learns from, and the
offline loop fine-tunes the base model on everything kept so far, in `<workdir>/train<r>`.
Randomness is a function of (seed, round, batch), so a rerun resamples the same episodes
and every round's offline run resumes from its own checkpoints.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from jaxscore import objectives as objectives_lib
from jaxscore import tasks
from jaxscore.infra import files, sharding
from jaxscore.loops import offline, online
from jaxscore.sampling import rollout as rollout_lib
from jaxscore.sampling import sampler as sampler_lib

# Round r's sampling keys are fold_in(seed, r * _ROUND_STRIDE + batch).
_ROUND_STRIDE = 100_003


def make_objective(c, setup: rollout_lib.Setup):
  return objectives_lib.make(c.objective, c[c.objective],
                             objectives_lib.Context(model_cfg=setup.cfg))


def make_sampler(setup: rollout_lib.Setup, problems, num_turns: int, max_new_tokens: int,
                 params=None, rules: sharding.Rules | None = None) -> sampler_lib.Sampler:
  """A sampler for `num_turns`-attempt episodes of any of `problems`. With `params` on a
  mesh, its rows (and KV cache) split over the mesh's batch axes by `rules`, as the
  online loop's and the evaluation's do, instead of every device sampling every row."""
  rows = None if params is None or rules is None else sharding.rows_sharding(params, rules)
  return rollout_lib.make_sampler(
      setup, rollout_lib.prompt_lens(setup, problems), num_turns, max_new_tokens,
      message_len=rollout_lib.instruction_len(setup, rollout_lib.Feedback("instruction")),
      batch_sharding=rows, rules=rules if rows else None)


def sample(params, setup: rollout_lib.Setup, smp: sampler_lib.Sampler, problems, *,
           num_turns: int, group_size: int, temperature: float, max_new_tokens: int,
           batch_size: int, seed: int, round_index: int = 0,
           token_budget: float | None = None):
  """`group_size` episodes per problem of `num_turns` attempts with the task's
  instruction between them, `batch_size // group_size` problems per sampler call (one
  compiled shape: the last call repeats its last problem; on a mesh, copies of it pad
  the rows to whole rows per device): (batches of (rollouts, real rows), problems used,
  tokens sampled). With `token_budget`, sampling stops after the call that reaches it."""
  feedback = rollout_lib.Feedback("instruction")
  sampling = sampler_lib.SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens)
  per_call = max(batch_size // group_size, 1)
  out, used, tokens = [], 0, 0
  for i, (_, chunk, real) in enumerate(sampler_lib.padded_chunks(problems, per_call)):
    if token_budget is not None and tokens >= token_budget:
      break
    real *= group_size  # Rows.
    rng = jax.random.fold_in(jax.random.key(seed), round_index * _ROUND_STRIDE + i)
    ro = rollout_lib.rollout(params, smp, setup, [p for p in chunk for _ in range(group_size)],
                             num_turns, sampling, rng, feedback=feedback,
                             group_size=group_size)
    tokens += sum(len(ro.ids[t][r]) for t in range(num_turns) for r in range(real))
    used += real // group_size
    out.append((ro, real))
  return out, used, tokens


def round_log(index: int, batches, used: int, group_size: int, tokens: int, kept: int
              ) -> dict:
  rewards = np.concatenate([ro.rewards_BxN[:real] for ro, real in batches])
  return {"round": index, "sampled": used * group_size, "tokens": tokens, "examples": kept,
          **{f"sample_acc@t{t + 1}": float(rewards[:, t].mean())
             for t in range(rewards.shape[1])}}


def train(c, setup: rollout_lib.Setup, params, workdir: str | os.PathLike, *,
          objective=None, token_budget: int | None = None):
  """Trains (or resumes) config `c`'s self-training objective from `params`; returns
  (params, info): info has `episodes` and `tokens` sampled, each round's log, and
  `preempted`.

  token_budget: sampled tokens (all turns) for the whole run, an equal share per round;
  each round stops sampling after the call that reaches its share (`problems_per_round`
  is then a cap).
  """
  objective = objective or make_objective(c, setup)
  if objective.kind != "self_training":
    raise ValueError(f"objective {objective.name!r} is {objective.kind}: not self-training")
  config, workdir = objective.config, files.path(workdir)
  problems = tasks.train_problems(setup.task, c.task)
  count = config.problems_per_round or len(problems)
  share = token_budget / objective.rounds if token_budget else None
  pair_rng = np.random.default_rng([c.seed, 1])
  rules = sharding.RULES[c.mesh.rules]
  current, kept, log, offset = params, [], [], 0
  for r in range(objective.rounds):
    sampling_params = current if objective.resamples else params
    # Rows split over the mesh the sampled params live on (the same sampler every round
    # once they live on the training mesh).
    smp = make_sampler(setup, problems, objective.turns, c.sampler.max_new_tokens,
                       sampling_params, rules)
    batches, used, tokens = sample(
        sampling_params, setup, smp,
        online.seeded_problems(problems, offset, count, c.seed), num_turns=objective.turns,
        group_size=config.group_size, temperature=config.temperature,
        max_new_tokens=c.sampler.max_new_tokens, batch_size=c.evaluate.batch_size,
        seed=c.seed, round_index=r, token_budget=share)
    offset += used
    kept += objective.keep(setup, batches, pair_rng)
    log.append(round_log(r, batches, used, config.group_size, tokens, len(kept)))
    print(f"[{objective.name}] round {r}: " + ", ".join(f"{k}={v}" for k, v in log[-1].items()))
    if len(kept) < c.offline.batch_size:
      print(f"[{objective.name}] {len(kept)} examples are fewer than one batch "
            f"(offline.batch_size={c.offline.batch_size}): the model is not trained")
      continue
    # Every round fine-tunes the base model on everything kept so far; the last round's
    # model is not held meanwhile, nor its optimizer state while the next round samples.
    current = sampling_params = None
    state, info = offline.train(c, setup.cfg, objective, params, params, kept,
                                workdir / f"train{r}")
    if info["preempted"]:
      return state.params, {"preempted": True, "rounds": log}
    current = state.params
    del state
  return current, {"preempted": False, "rounds": log,
                   "episodes": sum(x["sampled"] for x in log),
                   "tokens": sum(x["tokens"] for x in log)}
