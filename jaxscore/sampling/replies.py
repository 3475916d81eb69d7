"""Single-turn replies to any number of prompts, sampled in batches of one fixed size (one
compiled shape), each prompt prefilled once for its `group_size` samples: what pass@k,
Self-Explore's rationales and its step continuations all sample with.

  replier = Replier(setup, max_prompt_len=..., max_new_tokens=64, batch_size=32)
  texts = replier(params, prompts, sampling, rng, group_size=4)  # 4 per prompt, in order
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from jaxscore.infra import sharding
from jaxscore.sampling import rollout as rollout_lib
from jaxscore.sampling import sampler as sampler_lib


class Replier:
  """Samples replies to prompts (token ids): `batch_size` rows per sampler call.

  On a mesh (the one the params passed in live on) each call's rows split over its
  batch axes by `rules` (default: data parallel), the KV cache with them; a call whose
  prompts do not split is padded with copies of its last prompt, whose replies are
  dropped. A row's random stream is its index in the call, so every real reply is the
  one a single device samples.
  """

  def __init__(self, setup: rollout_lib.Setup, max_prompt_len: int, max_new_tokens: int,
               batch_size: int, rules: sharding.Rules | None = None):
    self.setup, self.batch_size, self.max_new_tokens = setup, batch_size, max_new_tokens
    self.max_prompt_len = max_prompt_len
    self.rules = rules or sharding.RULES["data_parallel"]

  def sampler(self, params) -> sampler_lib.Sampler:
    """The sampler for `params`' mesh (`Sampler.shared`: built once per mesh)."""
    rows = sharding.rows_sharding(params, self.rules)
    return rollout_lib.make_sampler(self.setup, [self.max_prompt_len], 1, self.max_new_tokens,
                                    message_len=0, batch_sharding=rows,
                                    rules=self.rules if rows else None)

  def __call__(self, params, prompts: Sequence[Sequence[int]],
               sampling: sampler_lib.SamplingConfig, rng, group_size: int = 1) -> list[str]:
    """`group_size` consecutive replies per prompt, in the prompts' order. The batch
    starting at prompt i samples with `fold_in(rng, i)`, so a prompt's replies do not
    depend on how many prompts come after it."""
    if self.batch_size % group_size:
      raise ValueError(f"batch_size={self.batch_size} is not a multiple of "
                       f"group_size={group_size}")
    sampling = sampler_lib.SamplingConfig(
        temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
        max_new_tokens=self.max_new_tokens)
    per_call = self.batch_size // group_size
    smp, out = self.sampler(params), []
    for start, padded, real in sampler_lib.padded_chunks(prompts, per_call):
      rows = [p for p in padded for _ in range(group_size)]
      rows += [rows[-1]] * rollout_lib.whole_rows_padding(len(rows), group_size,
                                                          smp.row_shards)
      if smp.batch_sharding is not None:  # Each process starts the rows it holds.
        rows = rows[slice(*sharding.process_rows(len(rows)))]
      state, group = rollout_lib.start_groups(smp, rows, jax.random.fold_in(rng, start),
                                              group_size)
      state = rollout_lib.first_turn(params, smp, state, sampling, group,
                                     pending=smp.max_prompt_len)
      ids = smp.episode(state).response_ids(1)[:real * group_size]
      out += [self.setup.tokenizer.decode(r, skip_special_tokens=True) for r in ids]
    return out
