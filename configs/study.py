"""Single- vs multi-turn RL with feedback (arXiv 2510.21339), SCoRe and its baselines,
trained on the same problems with the same number of sampled episodes and evaluated
with the same two protocols.

  python -m jaxscore.study --config=configs/study.py:cpu --workdir=runs/study
  python -m jaxscore.study --config=configs/study.py:gsm8k --workdir=... \
      --config.study.arms=base,single_turn_grpo,multi_turn_outcome

Every group of configs/score.py is here too (the arms override them), and the `study`
group (jaxscore.study.StudyConfig). Each arm is one line of `key=value` overrides
separated by `;`, its `objective` first (any registered objective, or `none` for no
training); `--config.arms.<name>="..."` changes one, `--config.study.arms` picks them.
"""

import importlib.util
import pathlib

import ml_collections

from jaxscore import config, study

VARIANTS = ("cpu", "gsm8k", "score_effect")
# The configs/score.py variant each study variant starts from.
_SCORE_VARIANT = {"score_effect": "cpu_correct"}
_SCORE = pathlib.Path(__file__).with_name("score.py")
SELF_REFINE_PROMPT = ("Review your previous answer step by step and point out any "
                      "mistakes. Then give a corrected solution, ending with the final "
                      "answer.")

VARIANT_CHANGES = {
    # The embedded model on held-out 1-digit additions: every arm samples 96 training
    # episodes (6 RL steps of 4 prompts x 4 samples).
    "cpu": {
        "study.episodes": 96,
        "study.train_turns": 2,
        "study.eval_turns": 4,
        "offline.num_epochs": 2,
    },
    # Whether SCoRe turns a second attempt that does not help into one that fixes the
    # first, against its ablations (SCoRe's Table 4), on configs/score.py:cpu_correct:
    # every arm samples the same episodes; the intrinsic protocol is the one that counts.
    "score_effect": {
        "study.arms": "base,score,score_alpha0,stage2_only,single_turn_pg,score_long_stage1",
        "study.reference_arm": "score",
        "study.episodes": 16 * 36,
        "study.train_turns": 2,
        "study.eval_turns": 2,
        "study.pass_k_samples": 2,
    },
    # GSM8K (the paper): 8-turn evaluation and pass@8, GRPO with 8 samples per prompt.
    "gsm8k": {
        "rollout.group_size": 8,
        "rollout.prompts_per_step": 64,
        "study.episodes": 512 * 300,
        "star.group_size": 8,
        "pair_sft.group_size": 8,
    },
}

RUNLOCAL = {
    "study.episodes": 8,
    "study.train_turns": 2,
    "study.eval_turns": 2,
    "study.pass_k_samples": 2,
    "star.group_size": 2,
    "pair_sft.group_size": 2,
    "evaluate.batch_size": 4,
    "grpo.epochs": 1,
    "grpo.minibatches": 2,
    "offline.batch_size": 1,  # STaR and Pair-SFT train on whatever few examples exist.
    "offline.num_epochs": 1,
}


def _score_module():
  spec = importlib.util.spec_from_file_location("score_config", _SCORE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def changes(arg: str = "cpu") -> dict:
  """Every field `arg` sets beyond the groups' defaults (the arms group aside): the
  configs/score.py variant's, then the study's."""
  variant, *options = arg.split(",") if arg else ["cpu"]
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}: {', '.join(VARIANTS)}")
  out = _score_module().changes(",".join([_SCORE_VARIANT.get(variant, variant), *options]))
  out |= VARIANT_CHANGES[variant]
  if "runlocal" in options:
    out |= RUNLOCAL
  return out


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  c = config.override(config.experiment(study=study.StudyConfig), changes(arg))

  rl_batch = c.rollout.prompts_per_step * c.rollout.group_size
  steps = max(c.study.episodes // rl_batch, 1)
  stage1 = max(steps // 3, 1) if steps > 1 else 0
  star_problems = max(c.study.episodes // c.star.rounds // c.star.group_size, 1)
  pair_problems = max(c.study.episodes // c.pair_sft.group_size, 1)
  multi = (f"objective=grpo;rollout.num_turns={c.study.train_turns};"
           f"rollout.feedback={c.study.eval_feedback};grpo.num_steps={steps}")
  c.arms = ml_collections.ConfigDict({
      "base": "objective=none",
      # Prompt-only: in the intrinsic protocol the model is asked to critique and revise
      # each answer (instead of SCoRe's instruction), whether or not it was right; no
      # training, so its pass@k and dialogue are the base model's.
      "self_refine": (f"objective=none;evaluate.feedback=instruction;"
                      f"rollout.feedback_template={SELF_REFINE_PROMPT}"),
      "single_turn_grpo": (f"objective=grpo;rollout.num_turns=1;"
                           f"rollout.feedback=instruction;grpo.num_steps={steps}"),
      "multi_turn_per_turn": multi + ";grpo.reward=per_turn",
      "multi_turn_outcome": multi + ";grpo.reward=outcome",
      "multi_turn_decayed": multi + ";grpo.reward=decayed",
      "score": ("objective=score;rollout.num_turns=2;rollout.feedback=instruction;"
                "score.stages=" + (f"I:{stage1},II:{steps - stage1}" if stage1
                                    else f"II:{steps}")),
      # SCoRe's ablations (its Table 4): no progress bonus; multi-turn RL without Stage
      # I; single-turn RL (the same objective, one attempt, no bonus).
      "score_alpha0": ("objective=score;rollout.num_turns=2;"
                       "rollout.feedback=instruction;score.alpha=0.0;score.stages="
                       + (f"I:{stage1},II:{steps - stage1}" if stage1 else f"II:{steps}")),
      # SCoRe tuned once within its recipe: two thirds of the steps in Stage I, whose
      # curves show attempt 2 gaining on an attempt 1 held near the base, and a third
      # in Stage II, which lifts attempt 1 until a second look has nothing to fix.
      "score_long_stage1": ("objective=score;rollout.num_turns=2;"
                            "rollout.feedback=instruction;score.stages="
                            + (f"I:{2 * steps // 3},II:{steps - 2 * steps // 3}"
                               if steps > 1 else f"II:{steps}")),
      "stage2_only": ("objective=score;rollout.num_turns=2;"
                      f"rollout.feedback=instruction;score.stages=II:{steps}"),
      "single_turn_pg": ("objective=pg;rollout.num_turns=1;"
                         f"rollout.feedback=instruction;pg.num_steps={steps};"
                         "pg.beta=" + str(c.score.beta1)),
      # Self-training on the same number of sampled episodes: problems per round.
      "star": f"objective=star;star.problems_per_round={star_problems}",
      "pair_sft": f"objective=pair_sft;pair_sft.problems_per_round={pair_problems}",
  })
  c.lock()
  return c
