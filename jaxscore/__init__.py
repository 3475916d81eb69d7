"""jaxscore: RL for reasoning and self-correction in pure-functional JAX.

Packages: `models` (the model families, weights, tokenizers), `sampling` (the
multi-turn sampler, episode formats, rollouts), `objectives` (RL building blocks and the
registry of methods), `loops` (train state, train step, online and offline loops),
`tasks` (datasets, answer checkers, the code sandbox), `infra` (sharding, multi-host,
checkpoints, files, metric writers), `self_explore` (the Self-Explore pipeline).

Shape suffixes, one legend for the package: B batch rows, G samples per prompt, T tokens
of a sequence (an episode, a training example or a chunk), S cache slots, V vocabulary,
C prefill chunk, D model width, F mlp width, K kv heads, H head dim, L layers, M message
tokens. N counts
turns in sampling, objectives, loops and evaluation, and query heads in `models.model`;
each module that uses it says which. `x_BxT` is a B x T array.
"""

__version__ = "0.1.0"
