"""Single- vs multi-turn RL with feedback (arXiv 2510.21339), SCoRe and its baselines,
trained on the same problems with the same number of sampled episodes and evaluated
with the same two protocols.

  python -m jaxscore.study --config=configs/study.py:cpu --workdir=runs/study
  python -m jaxscore.study --config=configs/study.py:gsm8k --workdir=... \
      --config.study.arms=base,single_turn_grpo,multi_turn_outcome

Every field of configs/score.py is here too (the arms override them). Each arm is one
line of `key=value` overrides separated by `;`, plus `method` (none | rl | star |
pair_sft); `--config.arms.<name>="..."` changes one, `--config.study.arms` picks them.
"""

import importlib.util
import pathlib

import ml_collections

VARIANTS = ("cpu", "gsm8k", "score_effect")
# The configs/score.py variant each study variant starts from.
_SCORE_VARIANT = {"score_effect": "cpu_correct"}
_SCORE = pathlib.Path(__file__).with_name("score.py")
SELF_REFINE_PROMPT = ("Review your previous answer step by step and point out any "
                      "mistakes. Then give a corrected solution, ending with the final "
                      "answer.")


def _score_config(variant: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location("score_config", _SCORE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  variant, *options = arg.split(",") if arg else ["cpu"]
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}: {', '.join(VARIANTS)}")
  c = _score_config(",".join([_SCORE_VARIANT.get(variant, variant), *options]))
  c.unlock()

  c.study = ml_collections.ConfigDict()
  c.study.arms = ("base,self_refine,single_turn_grpo,multi_turn_per_turn,"
                  "multi_turn_outcome,multi_turn_decayed,score,star,pair_sft")
  # What every arm gets the same amount of: `episodes` (sampled training episodes) or
  # `tokens` (sampled training tokens, all turns: multi-turn episodes are longer). With
  # `tokens`, `study.episodes` becomes each arm's cap (RL steps, STaR/Pair-SFT problems),
  # and the summary flags an arm that reached its cap before the token budget.
  c.study.budget = "episodes"
  c.study.episodes = 3072  # Sampled training episodes per arm (the equal budget).
  c.study.tokens = 0  # budget=tokens: sampled training tokens per arm.
  c.study.train_turns = 3  # Turns of the multi-turn arms' training episodes.
  c.study.eval_turns = 8  # T of the T-turn dialogue with feedback.
  c.study.eval_feedback = "unary"  # Between evaluation turns (none | unary | template).
  # The intrinsic protocol: this many greedy attempts with SCoRe's instruction after
  # each, correctness never revealed (SCoRe's evaluation: 2).
  c.study.intrinsic_turns = 2
  # The arm every other one is compared with, by paired intervals over problems.
  c.study.reference_arm = "single_turn_grpo"
  c.study.pass_k_samples = 8  # n samples per problem for pass@k, k = 1, 2, 4, ... n.
  c.study.pass_k_temperature = 1.0
  c.study.samples_per_problem = 4  # STaR and Pair-SFT: episodes sampled per problem.
  c.study.star_iterations = 2  # STaR rounds: sample -> filter -> fine-tune the base model.
  c.study.sample_temperature = 1.0  # STaR and Pair-SFT sampling.

  if variant == "cpu":
    # The embedded model on held-out 1-digit additions: every arm samples 96 training
    # episodes (6 RL steps of 4 prompts x 4 samples).
    c.study.episodes = 96
    c.study.train_turns = 2
    c.study.eval_turns = 4
    c.grpo.epochs, c.grpo.minibatches = 2, 2
    c.evaluate.batch_size = 20
    c.offline.batch_size = 8
    c.offline.num_epochs = 2
  elif variant == "score_effect":
    # Whether SCoRe turns a second attempt that does not help into one that fixes the
    # first, against its ablations (SCoRe's Table 4), on configs/score.py:cpu_correct:
    # every arm samples the same episodes; the intrinsic protocol is the one that counts.
    c.study.arms = "base,score,score_alpha0,stage2_only,single_turn_pg"
    c.study.reference_arm = "score"
    c.study.episodes = 16 * 36
    c.study.train_turns = 2
    c.study.eval_turns = 2
    c.study.pass_k_samples = 2
  elif variant == "gsm8k":
    # GSM8K (the paper): 8-turn evaluation and pass@8, GRPO with 8 samples per prompt.
    c.rollout.group_size = 8
    c.rollout.prompts_per_step = 64
    c.study.episodes = 512 * 300
    c.study.samples_per_problem = 8
  if "runlocal" in options:
    c.study.episodes = 8
    c.study.train_turns = 2
    c.study.eval_turns = 2
    c.study.pass_k_samples = 2
    c.study.samples_per_problem = 2
    c.evaluate.batch_size = 4
    c.grpo.epochs = 1
    c.grpo.minibatches = 2
    c.offline.batch_size = 1  # STaR and Pair-SFT train on whatever few examples exist.
    c.offline.num_epochs = 1

  rl_batch = c.rollout.prompts_per_step * c.rollout.group_size
  steps = max(c.study.episodes // rl_batch, 1)
  stage1 = max(steps // 3, 1) if steps > 1 else 0
  multi = (f"method=rl;objective=grpo;rollout.num_turns={c.study.train_turns};"
           f"rollout.feedback={c.study.eval_feedback};grpo.num_steps={steps}")
  c.arms = ml_collections.ConfigDict({
      "base": "method=none",
      # Prompt-only: in the intrinsic protocol the model is asked to critique and revise
      # each answer (instead of SCoRe's instruction), whether or not it was right; no
      # training, so its pass@k and dialogue are the base model's.
      "self_refine": (f"method=none;evaluate.feedback=instruction;"
                      f"rollout.feedback_template={SELF_REFINE_PROMPT}"),
      "single_turn_grpo": (f"method=rl;objective=grpo;rollout.num_turns=1;"
                           f"rollout.feedback=instruction;grpo.num_steps={steps}"),
      "multi_turn_per_turn": multi + ";grpo.reward=per_turn",
      "multi_turn_outcome": multi + ";grpo.reward=outcome",
      "multi_turn_decayed": multi + ";grpo.reward=decayed",
      "score": ("method=rl;objective=score;rollout.num_turns=2;rollout.feedback=instruction;"
                "score.stages=" + (f"I:{stage1},II:{steps - stage1}" if stage1
                                    else f"II:{steps}")),
      # SCoRe's ablations (its Table 4): no progress bonus; multi-turn RL without Stage
      # I; single-turn RL (the same objective, one attempt, no bonus).
      "score_alpha0": ("method=rl;objective=score;rollout.num_turns=2;"
                       "rollout.feedback=instruction;score.alpha=0.0;score.stages="
                       + (f"I:{stage1},II:{steps - stage1}" if stage1 else f"II:{steps}")),
      "stage2_only": ("method=rl;objective=score;rollout.num_turns=2;"
                      f"rollout.feedback=instruction;score.stages=II:{steps}"),
      "single_turn_pg": ("method=rl;objective=pg;rollout.num_turns=1;"
                         f"rollout.feedback=instruction;pg.num_steps={steps};"
                         "pg.beta=" + str(c.score.beta1)),
      "star": "method=star;objective=sft",
      "pair_sft": "method=pair_sft;objective=sft",
  })
  c.lock()
  return c
