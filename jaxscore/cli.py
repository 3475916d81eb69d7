"""The `jaxscore` command."""

from __future__ import annotations

import argparse
import sys
import time

from jaxscore.models import pretrained
from jaxscore.sampling import formats
from jaxscore.sampling import sampler as sampler_lib
from jaxscore.tasks import prompts

DEMO_QUESTION = "What is 27 + 58? Give the final answer as a number."


def two_turn_chat(model: pretrained.Pretrained, question: str, instruction: str,
                  max_new_tokens: int, seed: int = 0) -> tuple[str, str]:
  """Greedy attempt, then the self-correction instruction, then a second attempt."""
  import jax

  from jaxscore.sampling import rollout

  fmt = formats.ChatFormat(model.tokenizer)
  tok = model.tokenizer
  prompt = fmt.prompt_ids(question)
  message = fmt.instruction_ids(instruction)
  setup = rollout.Setup(model.cfg, tok, fmt, None, model.stop_ids)
  smp = rollout.make_sampler(setup, [len(prompt)], 2, max_new_tokens, message_len=len(message))
  greedy = sampler_lib.SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
  state = smp.generate(model.params, smp.start([prompt], jax.random.key(seed)), greedy)
  state = smp.add_message(state, [message])
  state = smp.generate(model.params, state, greedy)
  ep = smp.episode(state)
  return tuple(tok.decode(ep.response_ids(t)[0], skip_special_tokens=True).strip()
               for t in (1, 2))


def _chat(args) -> int:
  t0 = time.time()
  model = pretrained.load(args.model)
  print(f"loaded {args.model} ({model.path.name}) in {time.time() - t0:.1f}s")
  t0 = time.time()
  first, second = two_turn_chat(model, args.question, args.instruction, args.max_new_tokens)
  print(f"\n[user]\n{args.question}\n\n[assistant, attempt 1]\n{first}\n")
  print(f"[user]\n{args.instruction}\n\n[assistant, attempt 2]\n{second}\n")
  print(f"two turns sampled in {time.time() - t0:.1f}s")
  return 0


def _export(args) -> int:
  from jaxscore import export

  info = export.export(args.workdir, args.out, args.step, args.dtype)
  print(f"wrote {args.out}: step {info['step']} ({args.step}) of {args.workdir}, "
        f"{args.dtype} weights, tokenizer with its chat template; load it with "
        f"transformers.AutoModelForCausalLM.from_pretrained({str(args.out)!r})")
  if "adapter" in info:
    print(f"wrote {info['adapter']}: the LoRA adapters alone; load them with "
          f"peft.PeftModel.from_pretrained(<{info['adapter_base']}>, {info['adapter']!r})")
  if args.push_to_hub:
    url = export.push_to_hub(args.out, args.push_to_hub, private=not args.public)
    print(f"pushed {args.out} to {url}")
  return 0


def _evaluate(args) -> int:
  from jaxscore import evaluate, experiment, export
  from jaxscore.infra import files
  from jaxscore.loops import common
  from jaxscore.sampling import rollout

  c = export.run_config(args.workdir)
  for key, value in (("num_problems", args.num_problems), ("num_turns", args.num_turns),
                     ("pass_k_samples", args.pass_k_samples)):
    if value is not None:
      c.evaluate[key] = value
  workdir = files.path(args.workdir)
  _, eval_setup, base = rollout.from_config(c)
  params, step = common.restore_params(c, experiment.run_dir(c, workdir), eval_setup.cfg, base,
                                       args.step)
  if step is None:
    raise export.ExportError(f"{workdir} has no checkpoint yet: train first, or evaluate "
                             f"the base model with `python -m jaxscore.main --mode=evaluate`")
  label = f"step {step} ({args.step})"
  result = experiment.evaluate(c, eval_setup, params, workdir, f"step{step}")
  print("\n" + evaluate.format_table({label: result}, experiment.eval_turns(c)))
  print(f"\nreport: {workdir / 'eval'}")
  return 0


def _plan(args) -> int:
  from jaxscore import plan

  return plan.run(args, args.overrides)


def _add_plan(sub) -> None:
  """The `jaxscore plan` subcommand's flags."""
  plan = sub.add_parser(
      "plan", help="check a config and whether it fits, before launching it",
      description="Builds what a run builds at the config's real sizes without loading "
                  "weights, checks every constraint between config fields, compiles the "
                  "train step and the sampler ahead of time for the target's devices and "
                  "prints per-device memory. Exit status 0: fits; 1: does not fit; 2: a "
                  "user error. Further --config.KEY=VALUE arguments override the config.")
  plan.add_argument("--config", required=True, help="FILE:VARIANT, e.g. configs/score.py:math")
  target = plan.add_mutually_exclusive_group()
  target.add_argument("--topology", default=None,
                      help="a TPU slice, e.g. v5e:2x4 (v5e-8), v4:2x2x1, v5p:2x2x1; "
                           "needs libtpu (the compiler only, no TPU)")
  target.add_argument("--devices", type=int, default=None,
                      help="N fake CPU devices (default: this host's devices)")
  plan.add_argument("--slices", type=int, default=1,
                    help="with --topology: that many slices joined over DCN (set "
                         "--config.mesh.dcn to the same number)")
  plan.add_argument("--hbm_gib", type=float, default=None,
                    help="memory per device (default: the TPU generation's HBM)")
  plan.add_argument("--model", default=None,
                    help="a named shape (gemma3-4b, qwen3-8b, llama3.1-8b, ...), GGUF "
                         "file or HF directory instead of the config's model.name")
  plan.add_argument("--prompt_len", type=int, default=None,
                    help="longest prompt in tokens (default: read from the data where it "
                         "can be, else 512)")
  plan.set_defaults(run=_plan)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="jaxscore", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  chat = sub.add_parser("chat", help="two-turn self-correction chat with a model")
  chat.add_argument("--model", default=pretrained.DEFAULT_MODEL,
                    help="embedded model name, GGUF file or Hugging Face directory")
  chat.add_argument("--question", default=DEMO_QUESTION)
  chat.add_argument("--instruction", default=prompts.MATH_SELF_CORRECTION)
  chat.add_argument("--max_new_tokens", type=int, default=128)
  chat.set_defaults(run=_chat)
  export = sub.add_parser(
      "export", help="write a trained checkpoint as a transformers model directory",
      description="Writes config.json, model.safetensors and the tokenizer (with its chat "
                  "template) of a run's checkpoint, for transformers' from_pretrained.")
  export.add_argument("--workdir", required=True,
                      help="the run's directory (holds config.json and checkpoints/)")
  export.add_argument("--step", default="latest",
                      help="latest | best (by evaluation) | a step number")
  export.add_argument("--out", required=True, help="directory to write")
  export.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="weights' dtype in the safetensors file")
  export.add_argument("--push_to_hub", default="",
                      help="then upload the directory to this Hugging Face model repo "
                           "(org/name; HF_TOKEN or `hf auth login`)")
  export.add_argument("--public", action="store_true",
                      help="with --push_to_hub: create the repo public (default private)")
  export.set_defaults(run=_export)
  ev = sub.add_parser(
      "evaluate", help="evaluate a trained checkpoint of a run",
      description="Greedy T-turn accuracy (and pass@k if configured) of a run's checkpoint "
                  "on the evaluation split, with the run's own config (<workdir>/config.json); "
                  "writes <workdir>/eval/step<N>.json and prints the table.")
  ev.add_argument("--workdir", required=True,
                  help="the run's directory (holds config.json and checkpoints/)")
  ev.add_argument("--step", default="latest",
                  help="latest | best (by the run's best metric) | a step number")
  ev.add_argument("--num_problems", type=int, default=None,
                  help="evaluate the first N problems (default: the run's evaluate.num_problems)")
  ev.add_argument("--num_turns", type=int, default=None,
                  help="turns of the dialogue (default: the run's evaluate.num_turns)")
  ev.add_argument("--pass_k_samples", type=int, default=None,
                  help="samples per problem for pass@k (0: none; default: the run's)")
  ev.set_defaults(run=_evaluate)
  _add_plan(sub)
  args, rest = parser.parse_known_args(argv)
  overrides = [a[len("--config."):] for a in rest if a.startswith("--config.")]
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown or (overrides and args.command != "plan"):
    parser.error(f"unrecognized arguments: {' '.join(unknown or rest)}")
  args.overrides = overrides
  from jaxscore.infra import entry

  try:
    return args.run(args)
  except entry.user_errors() as e:  # One line, no traceback.
    entry.fail(f"jaxscore {args.command}", e)


if __name__ == "__main__":
  sys.exit(main())
