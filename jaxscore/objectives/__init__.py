"""Objectives: RL estimators (`rl`) and the registry of training methods.

  objective = objectives.make(c.objective, c[c.objective], ctx)

Built in: `score` (SCoRe), `pg` (multi-turn policy gradient; single-turn with one turn),
`grpo` (clipped-ratio GRPO with inner epochs, single- or multi-turn with feedback),
`sft` (supervised fine-tuning), `dpo` (preference pairs), and self-training on the
model's own samples: `star` (multi-turn STaR) and `pair_sft` (Pair-SFT). A new method is
one module with a `@register(name)` class (see `base`); importing it makes it selectable
by name.
"""

from jaxscore.objectives.base import (
                                      Context,
                                      OfflineObjective,
                                      OnlineObjective,
                                      Trajectories,
                                      get,
                                      make,
                                      names,
                                      register,
)

# Importing them registers the built-in objectives.
from jaxscore.objectives import (dpo, grpo, policy_gradient, score,  # isort: skip
                                 self_training, sft)

__all__ = ["Context", "OfflineObjective", "OnlineObjective", "Trajectories", "get", "make",
           "names", "register", "dpo", "grpo", "policy_gradient", "score", "self_training",
           "sft"]
