"""Multi-turn evaluation: Acc@t per turn, Delta(t1, t2), Delta i->c, Delta c->i, and the
edit-distance ratio between attempts (SPEC.md section 4)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import numpy as np

from jaxscore import files
from jaxscore import sampler as sampler_lib
from jaxscore import sharding
from jaxscore.tasks import base


@dataclasses.dataclass
class Rollouts:
  """Texts and token ids per turn of a batch of episodes, and their rewards.

  With several processes, each scores the rows it holds (`rows`, a slice); `scores`
  covers those rows and `rewards` all rows, gathered.
  """

  problems: list[base.Problem]
  texts: list[list[str]]  # [turn][row]
  ids: list[list[list[int]]]  # [turn][row]
  scores: list[list[base.Score]]  # [turn][row in `rows`]
  rewards: np.ndarray  # B x N
  rows: slice
  episode: sampler_lib.Episode

  def rewards_BxN(self) -> np.ndarray:
    return self.rewards


def max_episode_len(prompt_lens, num_turns: int, max_new_tokens: int,
                    instruction_len: int) -> int:
  """The longest episode the sampler can write: the longest prompt, every attempt at
  full length plus its end-of-turn, and each feedback message plus its end-of-turn."""
  return (max(prompt_lens) + num_turns * (max_new_tokens + 1)
          + (num_turns - 1) * (instruction_len + 1))


def make_sampler(cfg, fmt, tokenizer, prompt_lens, num_turns, max_new_tokens, instruction_len,
                 batch_sharding=None, rules=None):
  stop_ids = sorted({tokenizer.eos_token_id, fmt.end_of_turn_id} - {None})
  max_len = sampler_lib.bucket(
      max_episode_len(prompt_lens, num_turns, max_new_tokens, instruction_len), minimum=64)
  return sampler_lib.Sampler(cfg, max_len=max_len, stop_ids=stop_ids,
                             end_of_turn_id=fmt.end_of_turn_id,
                             pad_id=tokenizer.pad_token_id or 0, batch_sharding=batch_sharding,
                             rules=rules, max_prompt_len=max(prompt_lens))


def rollout(params, smp: sampler_lib.Sampler, fmt, tokenizer, task, problems: Sequence[base.Problem],
            num_turns: int, sampling: sampler_lib.SamplingConfig, rng, score_pool=None) -> Rollouts:
  """Samples `num_turns` attempts per problem, scoring each turn while the next samples.

  With a multi-process sampler, each process tokenizes, feeds and scores only its rows.
  """
  instruction = fmt.instruction_ids(task.instruction)
  mine = slice(*sharding.process_rows(len(problems)))
  feed = problems[mine] if smp.batch_sharding is not None else problems
  prompts = [fmt.prompt_ids(p.prompt) for p in feed]
  state = smp.start(prompts, rng)
  texts, ids, pending = [], [], []
  # Unseen tokens per row, known here: no device-to-host sync to size the prefill, and
  # the same bound (hence the same program) on every process.
  unseen = smp.max_prompt_len or max(map(len, prompts))
  for turn in range(1, num_turns + 1):
    if turn > 1:
      state = smp.add_message(state, [instruction] * len(feed))
      unseen = 2 + len(instruction)  # Last sampled token, a closing end-of-turn, message.
    state = smp.generate(params, state, sampling, pending=unseen)
    turn_ids = smp.episode(state).response_ids(turn)
    turn_texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in turn_ids]
    texts.append(turn_texts)
    ids.append(turn_ids)
    # Rewards run on the host (or in worker processes) while the device samples on;
    # each process scores the rows it holds.
    args = (list(problems[mine]), turn_texts[mine])
    pending.append(score_pool.submit(task.score, *args) if score_pool is not None
                   else task.score(*args))
  scores = [p.result() if hasattr(p, "result") else p for p in pending]
  local = np.array([[s.reward for s in turn] for turn in scores], np.float32).T
  return Rollouts(list(problems), texts, ids, scores, sharding.gather_rows(local), mine,
                  smp.episode(state))


def edit_distance(a: Sequence, b: Sequence) -> int:
  prev = list(range(len(b) + 1))
  for i, x in enumerate(a, 1):
    cur = [i] + [0] * len(b)
    for j, y in enumerate(b, 1):
      cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
    prev = cur
  return prev[-1]


def metrics(rewards_BxN: np.ndarray, ids: list[list[list[int]]] | None = None) -> dict:
  """SCoRe's metrics from per-turn 0/1 rewards (fractions of all problems)."""
  r = np.asarray(rewards_BxN, bool)
  out = {f"acc@t{t + 1}": float(r[:, t].mean()) for t in range(r.shape[1])}
  if r.shape[1] >= 2:
    out["delta(t1,t2)"] = out["acc@t2"] - out["acc@t1"]
    out["delta_i->c"] = float((~r[:, 0] & r[:, 1]).mean())
    out["delta_c->i"] = float((r[:, 0] & ~r[:, 1]).mean())
    if ids is not None:
      ratios = [edit_distance(a, b) / max(len(a) + len(b), 1) for a, b in zip(ids[0], ids[1])]
      out["edit_distance_ratio"] = float(np.mean(ratios))
  out["pass@turns"] = float(r.any(axis=1).mean())
  return out


def evaluate(params, cfg, tokenizer, fmt, task, problems: Sequence[base.Problem], *,
             num_turns: int = 2, max_new_tokens: int = 256, batch_size: int = 32,
             seed: int = 0) -> tuple[dict, list[dict]]:
  """Greedy multi-turn evaluation; returns (metrics, per-problem transcripts)."""
  greedy = sampler_lib.SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
  instruction_len = len(fmt.instruction_ids(task.instruction))
  prompt_lens = [len(fmt.prompt_ids(p.prompt)) for p in problems]
  smp = make_sampler(cfg, fmt, tokenizer, prompt_lens, num_turns, max_new_tokens,
                     instruction_len)
  rewards, ids, records = [], [[] for _ in range(num_turns)], []
  for start in range(0, len(problems), batch_size):
    chunk = list(problems[start:start + batch_size])
    # A fixed batch size keeps one compiled sampler: pad the last chunk.
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
    ro = rollout(params, smp, fmt, tokenizer, task, padded, num_turns, greedy,
                 jax.random.key(seed))
    rewards.append(ro.rewards_BxN()[:len(chunk)])
    for t in range(num_turns):
      ids[t] += ro.ids[t][:len(chunk)]
    for i, p in enumerate(chunk):
      # Another process scored rows outside ours: their rewards arrive, not the details.
      local = ro.rows.start <= i < ro.rows.stop
      detail = lambda t, f: getattr(ro.scores[t][i - ro.rows.start], f) if local else None
      records.append({"id": p.id, "prompt": p.prompt, "answer": p.answer,
                      "attempts": [ro.texts[t][i] for t in range(num_turns)],
                      "rewards": [float(ro.rewards[i, t]) for t in range(num_turns)],
                      "extracted": [detail(t, "extracted") for t in range(num_turns)],
                      "reasons": [detail(t, "reason") for t in range(num_turns)]})
  result = metrics(np.concatenate(rewards), ids)
  result["num_problems"] = len(problems)
  return result, records


def write_report(directory: str | os.PathLike, name: str, result: dict, records: list[dict]):
  """`<name>.json` (metrics + transcripts) and `<name>.png` (accuracy per turn)."""
  directory = files.path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / f"{name}.json").write_text(json.dumps({"metrics": result, "transcripts": records},
                                                     indent=1))
  plot_accuracy({name: result}, directory / f"{name}.png")


def plot_accuracy(results: dict[str, dict], path: str | os.PathLike) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 3.5))
  for label, result in results.items():
    turns = sorted(int(k[5:]) for k in result if k.startswith("acc@t"))
    ax.plot(turns, [100 * result[f"acc@t{t}"] for t in turns], marker="o", label=label)
    ax.set_xticks(turns)
  ax.set_xlabel("turn")
  ax.set_ylabel("accuracy (%)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  with files.path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)
