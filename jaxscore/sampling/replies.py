"""Single-turn replies to any number of prompts, sampled in batches of one fixed size (one
compiled shape), each prompt prefilled once for its `group_size` samples: what pass@k,
Self-Explore's rationales and its step continuations all sample with.

  replier = Replier(setup, max_prompt_len=..., max_new_tokens=64, batch_size=32)
  texts = replier(params, prompts, sampling, rng, group_size=4)  # 4 per prompt, in order
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from jaxscore.sampling import rollout as rollout_lib
from jaxscore.sampling import sampler as sampler_lib


class Replier:
  """Samples replies to prompts (token ids): `batch_size` rows per sampler call."""

  def __init__(self, setup: rollout_lib.Setup, max_prompt_len: int, max_new_tokens: int,
               batch_size: int):
    self.setup, self.batch_size, self.max_new_tokens = setup, batch_size, max_new_tokens
    self.sampler = rollout_lib.make_sampler(setup, [max_prompt_len], 1, max_new_tokens,
                                            message_len=0)

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
    smp, out = self.sampler, []
    for start, padded, real in sampler_lib.padded_chunks(prompts, per_call):
      state = smp.start(padded, jax.random.fold_in(rng, start))
      state = smp.generate_grouped(params, state, sampling, group_size,
                                   pending=smp.max_prompt_len)
      ids = smp.episode(state).response_ids(1)[:real * group_size]
      out += [self.setup.tokenizer.decode(r, skip_special_tokens=True) for r in ids]
    return out
