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
  smp = rollout.make_sampler(rollout.Setup(model.cfg, tok, fmt, task=None), [len(prompt)], 2,
                             max_new_tokens, message_len=len(message))
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
  return 0


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
  export.set_defaults(run=_export)
  args = parser.parse_args(argv)
  try:
    return args.run(args)
  except (ValueError, FileNotFoundError) as e:  # A user error: one line, no traceback.
    print(f"jaxscore {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
