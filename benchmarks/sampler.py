"""Sampler throughput side by side with transformers `generate` on the same weights.

  python benchmarks/sampler.py [--model embedded|gemma3-4b|qwen3-8b|...] [--batches 1,16,64]
                               [--new_tokens 64] [--out benchmarks/results]

The embedded SmolLM2-135M by default, or random weights in the shape of Qwen2.5-1.5B or
Llama-3-8B; float32 on CPU, bfloat16 weights and compute on a GPU or TPU (transformers
runs on CUDA there; on TPU there is no transformers baseline). Results per backend:
`sampler.md` on CPU, `sampler_gpu.md` / `sampler_tpu.md` elsewhere.

Measures, in one run on this machine:
  * decode tokens/s of jaxscore's sampler vs transformers `generate` (PyTorch, same
    weights dequantized from the same GGUF, same prompts, greedy, no early stop);
  * the fraction of the memory-bandwidth roofline reached by jaxscore's decode steps
    (weight + KV-cache bytes read per step / read bandwidth measured here);
  * turn-2 time with the carried KV cache vs re-prefilling the whole conversation;
  * with early stopping (rows end at EOS after different numbers of tokens): useful
    tokens/s with finished rows compacted out of the decoded batch vs decoding the
    whole batch to its last row, and vs transformers `generate` (which also stops when
    every row has ended), with the fraction of row-steps that were live.
Writes `<stem>.md` and `<stem>.json` under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import types

import jax
import jax.numpy as jnp
import numpy as np
from bench_util import MODELS, load_model, results_stem, timed, transformers_model, write_results  # pylint: disable=g-import-not-at-top

from jaxscore.sampling import formats
from jaxscore.sampling import sampler as sampler_lib
from jaxscore.tasks import prompts

QUESTIONS = [f"What is {a} + {b}? Explain step by step." for a, b in
             [(12, 7), (345, 678), (9, 9), (1024, 2048), (57, 86), (3, 14), (250, 750), (88, 11)]]
NEVER = -1  # A stop id no token matches, so every row decodes all new tokens.


def read_bandwidth_bytes_per_s() -> float:
  """Best of numpy and XLA reductions over a 1 GiB float32 array."""
  x = np.ones(256 * 1024 * 1024, np.float32)
  t_np = timed(lambda: x.sum(), repeats=3)
  xj = jnp.asarray(x)
  f = jax.jit(jnp.sum)
  t_jax = timed(lambda: f(xj).block_until_ready(), repeats=3)
  return x.nbytes / min(t_np, t_jax)


def whole_buffer_turn1(model, params, prompts_ids, max_len: int, greedy):
  """(seconds, response ids) of turn 1 with attention over the whole buffer every step
  (one decode window), for comparison with windowed decode."""
  tok = model.tokenizer
  whole = sampler_lib.Sampler(model.cfg, max_len=max_len, stop_ids=[NEVER],
                              pad_id=tok.pad_token_id or 0, min_window=max_len)

  def turn1_whole():
    state = whole.generate(params, whole.start(prompts_ids, jax.random.key(0)), greedy,
                           pending=max(map(len, prompts_ids)))
    return jax.block_until_ready(state)

  return timed(turn1_whole), whole.episode(turn1_whole()).response_ids(1)


def turn2_runs(smp, params, state1, instruction_ids, greedy) -> dict:
  """Turn 2 on the carried cache against re-prefilling the whole conversation: whole
  turns, prefills alone, and whether the tokens agree."""
  b = state1.length_B.shape[0]

  # Turn 2 on the carried cache: prefill 1 + instruction tokens, decode.
  def carried():
    state = smp.add_message(jax.tree.map(jnp.copy, state1), [instruction_ids] * b)
    return jax.block_until_ready(
        smp.generate(params, state, greedy, pending=1 + len(instruction_ids)))

  # Turn 2 from scratch: prefill the whole conversation, decode.
  ep = smp.episode(state1)
  conv = [np.asarray(ep.tokens_BxT)[i, :int(ep.length_B[i])].tolist() + instruction_ids
          for i in range(b)]

  def reprefill():
    state = smp.start(conv, jax.random.key(0))
    return jax.block_until_ready(smp.generate(params, state, greedy,
                                              pending=max(map(len, conv))))

  def carried_prefill():
    state = smp.add_message(jax.tree.map(jnp.copy, state1), [instruction_ids] * b)
    return jax.block_until_ready(smp.prefill(params, state,
                                             pending=1 + len(instruction_ids)))

  def full_prefill():
    state = smp.start(conv, jax.random.key(0))
    return jax.block_until_ready(smp.prefill(params, state,
                                             pending=max(map(len, conv))))

  t_carried, t_reprefill = timed(carried), timed(reprefill)
  t_carried_prefill, t_full_prefill = timed(carried_prefill), timed(full_prefill)
  # Turn 2's tokens must not depend on how the context got into the cache.
  same = (smp.episode(carried()).response_ids(2)
          == smp.episode(reprefill()).response_ids(1))
  return dict(turn2_carried_s=t_carried, turn2_reprefill_s=t_reprefill,
              turn2_prefill_carried_s=t_carried_prefill, turn2_prefill_full_s=t_full_prefill,
              turn2_tokens_identical=bool(same))


def jax_runs(model, prompts_ids, new_tokens, instruction_ids):
  tok = model.tokenizer
  max_len = sampler_lib.bucket(max(map(len, prompts_ids)) + 2 * new_tokens
                               + len(instruction_ids) + 1)
  smp = sampler_lib.Sampler(model.cfg, max_len=max_len, stop_ids=[NEVER],
                            pad_id=tok.pad_token_id or 0)
  greedy = sampler_lib.SamplingConfig(temperature=0.0, max_new_tokens=new_tokens)
  params = jax.device_put(model.params)

  def prefill():
    state = smp.start(prompts_ids, jax.random.key(0))
    state, logits = smp.prefill(params, state, pending=max(map(len, prompts_ids)))
    jax.block_until_ready(logits)
    return state, logits

  def turn1():
    state = smp.generate(params, smp.start(prompts_ids, jax.random.key(0)), greedy,
                         pending=max(map(len, prompts_ids)))
    return jax.block_until_ready(state)

  t_prefill = timed(prefill)
  t_turn1 = timed(turn1)
  state1 = turn1()
  t_turn1_whole, whole_ids = whole_buffer_turn1(model, params, prompts_ids, max_len, greedy)
  same_whole = smp.episode(state1).response_ids(1) == whole_ids
  # Cache slots a windowed decode step reads, averaged over the turn's steps.
  longest = max(map(len, prompts_ids))
  mean_window = float(np.mean([smp.window(longest + i) for i in range(new_tokens)]))

  turn2 = turn2_runs(smp, params, state1, instruction_ids, greedy)
  return dict(prefill_s=t_prefill, turn1_s=t_turn1, decode_s=t_turn1 - t_prefill,
              turn1_whole_s=t_turn1_whole, decode_whole_s=t_turn1_whole - t_prefill,
              whole_tokens_identical=bool(same_whole), mean_window=mean_window,
              max_len=max_len, responses=smp.episode(state1).response_ids(1), **turn2)


def early_stop_runs(model, prompts_ids, max_new_tokens: int, hf_model) -> dict:
  """Greedy turn 1 that stops at EOS: compacted vs whole-batch decode (vs transformers)."""
  tok = model.tokenizer
  params = jax.device_put(model.params)
  greedy = sampler_lib.SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
  max_len = sampler_lib.bucket(max(map(len, prompts_ids)) + max_new_tokens)
  out = {}
  for name, rows in (("compacted", 8), ("whole", None)):
    smp = sampler_lib.Sampler(model.cfg, max_len=max_len, stop_ids=[tok.eos_token_id],
                              pad_id=tok.pad_token_id or 0, min_compact_rows=rows)

    def turn1():
      state = smp.generate(params, smp.start(prompts_ids, jax.random.key(0)), greedy)
      return jax.block_until_ready(state)

    out[f"{name}_s"] = timed(turn1, repeats=1)
    out[f"{name}_ids"] = smp.episode(turn1()).response_ids(1)
  lengths = [len(r) for r in out["compacted_ids"]]
  r = dict(early_tokens=sum(lengths), early_compacted_s=out["compacted_s"],
           early_whole_s=out["whole_s"], early_longest=max(lengths),
           early_live_fraction=sum(lengths) / (len(lengths) * max(lengths)),
           early_tokens_identical=out["compacted_ids"] == out["whole_ids"])
  if hf_model is not None:
    hf_s, hf_ids = hf_run(hf_model, tok, prompts_ids, max_new_tokens, early_stop=True)
    r |= dict(early_hf_s=hf_s, early_hf_rows_identical=sum(
        _same_until_eos(a, h, tok.eos_token_id) for a, h in zip(out["compacted_ids"], hf_ids)))
  return r


def hf_run(hf_model, tok, prompts_ids, new_tokens, early_stop=False):
  import torch

  width = max(map(len, prompts_ids))
  pad = tok.pad_token_id or 0
  ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts_ids])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts_ids])
  ids, mask = ids.to(hf_model.device), mask.to(hf_model.device)
  out = {}

  def gen():
    with torch.no_grad():
      out["ids"] = hf_model.generate(
          input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
          min_new_tokens=1 if early_stop else new_tokens, do_sample=False, pad_token_id=pad,
          eos_token_id=tok.eos_token_id)
    if hf_model.device.type == "cuda":
      torch.cuda.synchronize()

  t = timed(gen, repeats=1 if early_stop else 2)
  return t, [row[width:].tolist() for row in out["ids"]]


def _same_until_eos(ours, theirs, eos):
  """Rows agree up to our first EOS: transformers' min_new_tokens masks EOS, and after
  EOS it pads."""
  cut = ours.index(eos) if eos in ours else len(ours)
  return ours[:cut] == theirs[:cut]


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="embedded", choices=MODELS,
                      help="the embedded model, or random weights of Qwen2.5-1.5B / "
                           "Llama-3-8B shape")
  parser.add_argument("--batches", default="1,16,64")
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
  parser.add_argument("--no_hf", action="store_true", help="skip transformers")
  parser.add_argument("--early_stop_batches", default="16,64",
                      help="batches for the early-stopping comparison ('' skips it)")
  parser.add_argument("--early_stop_tokens", type=int, default=192)
  return parser.parse_args()


def measure_batch(model, b: int, args, instruction_ids, bandwidth, param_bytes, hf_model):
  fmt = formats.ChatFormat(model.tokenizer)
  cfg = model.cfg
  prompts_ids = [fmt.prompt_ids(QUESTIONS[i % len(QUESTIONS)]) for i in range(b)]
  r = jax_runs(model, prompts_ids, args.new_tokens, instruction_ids)
  steps = args.new_tokens
  # Bytes one decode step reads: every weight once (the tied embedding is the LM head)
  # and both K and V of the cache window in every layer.
  kv_bytes = (2 * cfg.num_layers * b * r["mean_window"] * cfg.num_kv_heads * cfg.head_dim
              * jnp.dtype(cfg.dtype).itemsize)
  step_s = r["decode_s"] / steps
  row = dict(
      batch=b, jax_decode_tok_s=b * steps / r["decode_s"],
      whole_buffer_decode_tok_s=b * steps / r["decode_whole_s"],
      windowed_vs_whole=r["decode_whole_s"] / r["decode_s"],
      whole_tokens_identical=r["whole_tokens_identical"], max_len=r["max_len"],
      mean_window=r["mean_window"],
      jax_total_s=r["turn1_s"], jax_prefill_s=r["prefill_s"],
      roofline_weights=(param_bytes / bandwidth) / step_s,
      roofline_weights_and_kv=((param_bytes + kv_bytes) / bandwidth) / step_s,
      turn2_carried_s=r["turn2_carried_s"], turn2_reprefill_s=r["turn2_reprefill_s"],
      turn2_speedup=r["turn2_reprefill_s"] / r["turn2_carried_s"],
      turn2_prefill_speedup=r["turn2_prefill_full_s"] / r["turn2_prefill_carried_s"],
      turn2_tokens_identical=r["turn2_tokens_identical"])
  if hf_model is not None:
    hf_s, hf_out = hf_run(hf_model, model.tokenizer, prompts_ids, steps)
    row |= dict(hf_total_s=hf_s, hf_tok_s=b * steps / hf_s,
                speedup_end_to_end=hf_s / r["turn1_s"],
                greedy_rows_identical=sum(
                    _same_until_eos(a, h, model.tokenizer.eos_token_id)
                    for a, h in zip(r["responses"], hf_out)))
  if b in args.early_batches:
    row |= early_stop_runs(model, prompts_ids, args.early_stop_tokens, hf_model)
  return row


def main():
  args = parse_args()
  args.early_batches = [int(b) for b in args.early_stop_batches.split(",") if b]
  cfg, params, tokenizer = load_model(args.model)
  model = types.SimpleNamespace(cfg=cfg, params=params, tokenizer=tokenizer)
  instruction_ids = formats.ChatFormat(tokenizer).instruction_ids(prompts.MATH_SELF_CORRECTION)
  bandwidth = read_bandwidth_bytes_per_s()
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  # transformers has no TPU backend: there the table has jaxscore's side only.
  skip_hf = args.no_hf or jax.default_backend() == "tpu"
  hf_model = None if skip_hf else transformers_model(cfg, params)
  rows = []
  for b in map(int, args.batches.split(",")):
    rows.append(measure_batch(model, b, args, instruction_ids, bandwidth, param_bytes,
                              hf_model))
    print(json.dumps(rows[-1]), flush=True)
  meta = dict(device=str(jax.devices()[0]), backend=jax.default_backend(),
              cpus=os.cpu_count(), jax=jax.__version__, machine=platform.machine(),
              read_bandwidth_GBps=bandwidth / 1e9, param_MB=param_bytes / 1e6,
              new_tokens=args.new_tokens, model=args.model, dtype=cfg.dtype,
              early_stop_tokens=args.early_stop_tokens,
              params_m=sum(x.size for x in jax.tree.leaves(params)) / 1e6)
  write_results(pathlib.Path(args.out), results_stem("sampler"), dict(meta=meta, rows=rows),
                render(meta, rows).splitlines())


def _model_name(meta) -> str:
  model = meta.get("model", "embedded")
  if model == "embedded":
    return "SmolLM2-135M-Instruct (embedded GGUF, dequantized)"
  return f"random weights in the shape of {model} ({meta['params_m']:.0f}M params)"


def render(meta, rows) -> str:
  lines = [
      "# Sampler benchmark (generated by benchmarks/sampler.py)", "",
      f"{_model_name(meta)}, {meta.get('dtype', 'float32')}, greedy, "
      f"{meta['new_tokens']} new tokens per row, no early stop; transformers `generate` "
      f"on the same weights. {meta['device']}, "
      f"{meta['cpus']} CPUs, jax {meta['jax']}. Measured read bandwidth "
      f"{meta['read_bandwidth_GBps']:.1f} GB/s; weights {meta['param_MB']:.0f} MB. Decode "
      f"and prefill attend to cache windows of 64, 128, ... slots (mean decode window per "
      "step in the table) instead of the whole buffer (" + ", ".join(
          f"{r['max_len']} slots at batch {r['batch']}" for r in rows) + "); `whole buffer` "
      "is the same sampler with one window, measured side by side.", "",
      "| batch | jaxscore tok/s (turn 1) | transformers tok/s | ratio | greedy rows identical "
      "| decode tok/s | whole-buffer decode tok/s | windowed vs whole | mean window "
      "| roofline (weights) | roofline (weights + KV) | turn 2 carried s "
      "| turn 2 re-prefill s | ratio | turn 2 prefill only: ratio |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    hf = (f"{r['hf_tok_s']:.1f} | {r['speedup_end_to_end']:.2f}x | "
          f"{r['greedy_rows_identical']}/{r['batch']}") if "hf_tok_s" in r else "- | - | -"
    total_tok_s = r["batch"] * meta["new_tokens"] / r["jax_total_s"]
    lines.append(
        f"| {r['batch']} | {total_tok_s:.1f} | {hf} | {r['jax_decode_tok_s']:.1f} | "
        f"{r['whole_buffer_decode_tok_s']:.1f} | {r['windowed_vs_whole']:.2f}x "
        f"({'same' if r['whole_tokens_identical'] else 'DIFFERENT'} tokens) | "
        f"{r['mean_window']:.0f} | "
        f"{100 * r['roofline_weights']:.0f}% | {100 * r['roofline_weights_and_kv']:.0f}% | "
        f"{r['turn2_carried_s']:.2f} | {r['turn2_reprefill_s']:.2f} | "
        f"{r['turn2_speedup']:.2f}x | {r['turn2_prefill_speedup']:.2f}x |")
  return "\n".join(lines + _render_early_stop(meta, rows)) + "\n"


def _render_early_stop(meta, rows) -> list[str]:
  early = [r for r in rows if "early_tokens" in r]
  if not early:
    return []
  lines = [
      "", "## Early stopping: compacting finished rows", "",
      f"Greedy, rows stop at EOS (at most {meta.get('early_stop_tokens')} tokens). Useful "
      "tokens/s (tokens rows actually produced, over the turn's wall time) with finished "
      "rows gathered out of the decoded batch (power-of-two batches of at least 8 rows) "
      "vs decoding the whole batch until its last row ends, and transformers `generate` "
      "with the same stop. `live` is the fraction of row-steps that produced a token "
      "(what a batch that never shrinks spends on useful rows).", "",
      "| batch | tokens | longest row | live | compacted tok/s | whole-batch tok/s "
      "| compacted vs whole | transformers tok/s | compacted vs transformers "
      "| identical rows |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in early:
    tok_s = lambda s: r["early_tokens"] / s
    hf = (f"{tok_s(r['early_hf_s']):.1f} | {r['early_hf_s'] / r['early_compacted_s']:.2f}x"
          if "early_hf_s" in r else "- | -")
    same = "same as whole" if r["early_tokens_identical"] else "DIFFERENT from whole"
    if "early_hf_rows_identical" in r:
      same += f"; {r['early_hf_rows_identical']}/{r['batch']} as transformers"
    lines.append(
        f"| {r['batch']} | {r['early_tokens']} | {r['early_longest']} | "
        f"{100 * r['early_live_fraction']:.0f}% | {tok_s(r['early_compacted_s']):.1f} | "
        f"{tok_s(r['early_whole_s']):.1f} | "
        f"{r['early_whole_s'] / r['early_compacted_s']:.2f}x | {hf} | {same} |")
  return lines


if __name__ == "__main__":
  main()
