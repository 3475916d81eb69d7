"""Self-Explore: SFT -> RFT -> first-pit exploration -> step-level DPO, and the outcome-DPO
baseline, evaluated side by side.

  python -m jaxscore.self_explore --config=configs/self_explore.py:cpu --workdir=runs/se-cpu

Variants (`:name`): cpu (the embedded SmolLM2 on one- and two-step arithmetic, about
25 minutes on 2 CPU cores), gsm8k and math (the paper's hyperparameters; bring a 7B
model with `--config.model.name=<HF directory>`); append `,runlocal` for a smoke run.
Every field is commented; the groups mirror the functions they feed.
"""

import ml_collections

VARIANTS = ("cpu", "gsm8k", "math")


def _sources(*splits: str) -> ml_collections.ConfigDict:
  """Each split's data (--config.task.kwargs.sources.<split>=...): a .jsonl/.json file,
  `hub:<name>[:<config>]`, or "" for the task's default (the hub)."""
  return ml_collections.ConfigDict({split: "" for split in splits})


def _train_group(batch_size: int, num_epochs: int, max_len: int, optimizer: str, lr: float,
                 schedule: str, warmup_fraction: float) -> ml_collections.ConfigDict:
  """One training stage: the offline loop (OfflineConfig) and its optimizer (OptimConfig)."""
  g = ml_collections.ConfigDict()
  g.offline = ml_collections.ConfigDict()
  g.offline.batch_size = batch_size  # Examples per step.
  g.offline.num_epochs = num_epochs
  g.offline.max_len = max_len  # Tokens per example (longer are cut); 0: the longest.
  g.optim = ml_collections.ConfigDict()
  g.optim.optimizer = optimizer  # adam | adamw | rmsprop
  g.optim.learning_rate = lr
  g.optim.warmup_steps = 0  # Set from warmup_fraction when that is > 0.
  g.optim.schedule = schedule  # constant | cosine | linear (to 0 at the last step)
  g.optim.total_steps = 0  # 0: the stage's number of steps.
  g.optim.b1 = 0.9
  g.optim.b2 = 0.999  # Adam's second-moment decay; RMSprop's decay (0.99 there).
  g.optim.weight_decay = 0.0
  g.optim.max_grad_norm = 1.0  # 0 disables clipping.
  g.optim.grad_accum_steps = 1  # Train steps per optimizer update.
  # Each step's batch split into this many slices whose gradients are summed before
  # its one update (the same update, one slice's activations at a time).
  g.optim.micro_batches = 1
  g.warmup_fraction = warmup_fraction  # Linear warmup over this share of the steps.
  return g


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds sampling and data order.

  c.model = ml_collections.ConfigDict()
  c.model.name = "smollm2-135m-instruct"  # Embedded name, GGUF file or HF directory.
  c.model.param_dtype = "float32"
  c.model.dtype = "float32"
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
  c.task.name = "arithmetic"  # arithmetic | gsm8k | math (needs gold rationales)
  c.task.kwargs = ml_collections.ConfigDict()  # Task fields (sources, level, prompt...).
  c.task.train_split = "train"
  c.task.eval_split = "test"
  c.task.num_train = 0  # Training problems used; 0 = the whole split.
  c.format = "chat"  # chat | plain

  # Stage 2: N rationales per training problem from the SFT model.
  c.sample = ml_collections.ConfigDict()
  c.sample.num_samples = 100  # N (the paper: 100).
  c.sample.temperature = 0.7
  c.sample.max_new_tokens = 512  # The reference code: 512 (GSM8K), 1024 (MATH).
  # Rows per sampler call: a multiple of num_samples, since a problem's N samples share
  # one prefill in one call (100 rows of 7B decode fit a v5e-8 slice).
  c.sample.batch_size = 100
  c.sample.max_rft_per_problem = 8  # Distinct correct rationales kept per problem.
  # The reference code's data rules (jaxscore.self_explore.explore.rationale_data):
  # gsm8k (every equation must hold; distinct by equations; pair with the farthest wrong
  # one) | math (distinct by edit distance; pair with the shortest wrong one above a
  # normalised edit distance of 0.5, then 0.4, then 0.3).
  c.sample.rules = "gsm8k"

  # Stage 3: RFT data.
  c.rft = ml_collections.ConfigDict()
  c.rft.include_gold = False  # Also train on the gold rationales (RFT as in Yuan et al.).

  # Stage 4: first-pit exploration of the outcome pairs' wrong rationales.
  c.explore = ml_collections.ConfigDict()
  c.explore.k = 4  # Completions per step prefix (the paper: 4).
  c.explore.temperature = 0.7
  c.explore.max_new_tokens = 512  # Per completion.
  c.explore.style = "lines"  # lines (GSM8K) | sentences (MATH, capped at max_steps)
  c.explore.max_steps = 9
  c.explore.max_rationales = 0  # Rationales explored; 0 = every outcome pair's.
  c.explore.batch_size = 64  # Rows per sampler call: a multiple of k.

  # Objectives (jaxscore.objectives.sft / dpo).
  c.sft = ml_collections.ConfigDict()
  c.sft.aggregation = "token_mean"
  c.dpo = ml_collections.ConfigDict()
  c.dpo.beta = 0.1  # The paper: 0.1.

  # Training stages. The reference code: SFT/RFT lr 1e-5, 5 epochs, linear, batch 64;
  # DPO lr 1e-6, 3 epochs, RMSprop, batch 32, linear with 10% warmup, 384 tokens.
  c.train_sft = _train_group(64, 5, 0, "adam", 1e-5, "linear", 0.0)
  c.train_rft = _train_group(64, 5, 0, "adam", 1e-5, "linear", 0.0)
  c.train_dpo = _train_group(32, 3, 384, "rmsprop", 1e-6, "linear", 0.1)
  # The reference code trains DPO with transformers' optim="rmsprop": PyTorch's RMSprop
  # and its default decay alpha = 0.99 (the paper names the optimizer, not its decay).
  c.train_dpo.optim.b2 = 0.99

  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.num_problems = 0  # 0 = the whole test split.
  c.evaluate.batch_size = 64
  c.evaluate.max_new_tokens = 512

  c.mesh = ml_collections.ConfigDict()
  c.mesh.dcn = 1  # Slices (data-parallel across them over DCN); the axes below are per slice.
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.rules = "data_parallel"  # data_parallel | fsdp | fsdp_tp

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 200  # Also saved at the end of each stage and on SIGTERM.
  c.checkpoint.keep = 1  # Per stage; plus the best by evaluation loss, when there is one.
  c.checkpoint.async_save = True

  c.log = ml_collections.ConfigDict()
  c.log.transcripts_every = 0  # Offline stages write no transcripts.
  c.log.num_transcripts = 0
  # Weights & Biases (pip install 'jaxscore[wandb]'): "" logs to files only.
  c.log.wandb_project = ""
  c.log.wandb_entity = ""

  variant, *options = arg.split(",") if arg else ["cpu"]
  if variant == "cpu":
    # One- and two-step arithmetic on single digits ("a + b", "a + b - c"), with a
    # one-shot worked example: the gold rationale is one line of arithmetic per step and
    # the answer, so steps are real and SFT has data. The 135M model adds one digit well
    # but rarely keeps a two-line format, so the mixture lands in the base-accuracy band
    # that leaves room to improve (about 1/3); two-step problems alone give 13%.
    # Half the problems are test ones: one-step sums have only 81 distinct problems.
    c.task.kwargs = ml_collections.ConfigDict({
        "level": "mixed", "num_test": 100, "test_fraction": 0.5,
        "prompt_template": "Solve step by step, one calculation per line, as in the "
                           "example.\n\nExample: What is 4 + 3 - 2?\n4 + 3 = 7\n7 - 2 = 5\n"
                           "The answer is 5.\n\nNow: {question}"})
    c.task.num_train = 128
    c.sample.num_samples = 4
    c.sample.max_new_tokens = 48
    c.sample.batch_size = 32
    c.explore.max_new_tokens = 40
    c.explore.max_rationales = 48
    c.explore.batch_size = 32
    c.train_sft = _train_group(16, 2, 0, "adam", 3e-5, "linear", 0.0)
    c.train_rft = _train_group(16, 2, 0, "adam", 3e-5, "linear", 0.0)
    c.train_dpo = _train_group(8, 3, 160, "rmsprop", 1e-6, "linear", 0.1)
    c.train_dpo.optim.b2 = 0.99
    c.evaluate.batch_size = 50
    c.evaluate.max_new_tokens = 48
    c.checkpoint.every_steps = 50
  elif variant == "gsm8k":
    c.task.name = "gsm8k"
    c.task.kwargs = ml_collections.ConfigDict({"sources": _sources("train", "test")})
  elif variant == "math":
    c.task.name = "math"  # No hub default for train: set sources.train to a MATH file.
    c.task.kwargs = ml_collections.ConfigDict({"sources": _sources("train", "test")})
    c.sample.max_new_tokens = 1024
    c.sample.rules = "math"
    c.explore.max_new_tokens = 1024
    c.explore.style = "sentences"
    c.train_dpo.offline.max_len = 1024
    c.evaluate.max_new_tokens = 1024
  else:
    raise ValueError(f"unknown variant {variant!r}: {', '.join(VARIANTS)}")
  for option in options:
    if option == "runlocal":  # Seconds-sized smoke run of any variant.
      c.task.num_train = 8
      c.rft.include_gold = True  # A smoke-sized SFT model rarely samples a correct answer.
      c.sample.num_samples = 2
      c.sample.max_new_tokens = 12
      c.sample.batch_size = 8
      c.explore.k = 2
      c.explore.max_new_tokens = 8
      c.explore.max_rationales = 4
      c.explore.batch_size = 8
      for g in (c.train_sft, c.train_rft, c.train_dpo):
        g.offline.batch_size, g.offline.num_epochs = 2, 1
      c.train_dpo.offline.max_len = 96
      c.evaluate.num_problems = 4
      c.evaluate.batch_size = 4
      c.evaluate.max_new_tokens = 12
    else:
      raise ValueError(f"unknown option {option!r} (runlocal)")
  c.lock()
  return c
