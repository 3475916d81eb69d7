"""Objectives: RL building blocks (`rl`) and the registry of training methods.

  objective = objectives.make(c.objective, c[c.objective], ctx)

Built in: `score` (SCoRe), `pg` (multi-turn policy gradient; single-turn with one turn),
`sft` (supervised fine-tuning). A new method is one module with a `@register(name)`
class (see `base`); importing it makes it selectable by name.
"""

from jaxscore.objectives.base import (Context, OfflineObjective, OnlineObjective,
                                      Trajectories, get, make, names, register)
# Importing registers them.
from jaxscore.objectives import policy_gradient, score, sft  # noqa: E402,F401  isort: skip
