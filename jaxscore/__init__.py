"""jaxscore: RL for reasoning and self-correction in pure-functional JAX.

Packages: `models` (the model families, weights, tokenizers), `sampling` (the
multi-turn sampler, episode formats, rollouts), `objectives` (RL building blocks and the
registry of methods), `loops` (train state, train step, online and offline loops),
`tasks` (datasets, answer checkers, the code sandbox), `infra` (sharding, multi-host,
checkpoints, files, metric writers), `self_explore` (the Self-Explore pipeline).

Shape suffixes, one legend for the package, one letter per axis: B batch rows, G samples
per prompt, N turns, T tokens of a sequence (an episode, a training example or a chunk),
S cache slots, V vocabulary, C prefill chunk, D model width, F mlp width, Q query heads,
K kv heads, H head dim, L layers, M message tokens. `x_BxT` is a B x T array.
"""

__version__ = "0.1.0"
