"""Every variant of every config file builds and passes the consistency checks at its
real size, and a config whose fields contradict each other fails when it is loaded,
naming the fields and the fix."""

import importlib.util
import pathlib

import pytest

from jaxscore import config_checks

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECKS = {"score": config_checks.check_experiment,
          "self_explore": config_checks.check_self_explore,
          "study": config_checks.check_study}


def _module(name: str):
  spec = importlib.util.spec_from_file_location(f"configs_{name}",
                                                ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _config(name: str, arg: str):
  c = _module(name).get_config(arg)
  c.unlock()
  return c


def test_every_config_file_is_covered():
  assert sorted(p.stem for p in (ROOT / "configs").glob("*.py")) == sorted(CHECKS)


@pytest.mark.parametrize("name, arg", [
    (name, variant + option) for name in CHECKS for variant in _module(name).VARIANTS
    for option in ("", ",runlocal")])
def test_every_variant_builds_and_passes_its_checks(name, arg):
  c = _module(name).get_config(arg)
  CHECKS[name](c)
  with pytest.raises(ValueError, match="unknown variant 'nope'"):
    _module(name).get_config("nope")


def _fails(name: str, arg: str, overrides: dict, *named: str) -> str:
  c = _config(name, arg)
  for key, value in overrides.items():
    node, *path = key.split(".")
    target = c[node]
    for part in path[:-1]:
      target = target[part]
    if path:
      target[path[-1]] = value
    else:
      c[node] = value
  with pytest.raises(config_checks.ConfigError) as e:
    CHECKS[name](c)
  message = str(e.value)
  for field in named:
    assert field in message, message
  return message


def test_self_explore_batches_must_hold_whole_groups():
  # The paper-size variants once shipped with 64-row batches and N = 100.
  message = _fails("self_explore", "gsm8k", {"sample.batch_size": 64},
                   "sample.batch_size=64", "sample.num_samples=100")
  assert "multiple of 100" in message
  _fails("self_explore", "cpu", {"explore.batch_size": 30}, "explore.batch_size=30",
         "explore.k=4")
  _fails("self_explore", "math", {"train_dpo.warmup_fraction": 1.5},
         "train_dpo.warmup_fraction")
  _fails("self_explore", "cpu", {"explore.style": "paragraphs"}, "explore.style")
  _fails("self_explore", "cpu", {"train_rft.optim.optimizer": "sgd"},
         "train_rft.optim")


def test_rl_batches_must_split_as_the_objective_and_mesh_split_them():
  # cpu: 4 prompts x 4 samples = 16 rows.
  _fails("score", "cpu", {"objective": "grpo", "grpo.minibatches": 3},
         "rollout.prompts_per_step", "rollout.group_size", "grpo.minibatches=3")
  _fails("score", "cpu", {"rollout.group_size": 1}, "score.advantage='rloo'",
         "rollout.group_size")
  _fails("score", "cpu", {"mesh.data": 3}, "mesh.data", "16 rows")
  _fails("score", "cpu", {"objective": "pg", "rollout.feedback": "unary",
                          "rollout.score_overlap_splits": 3},
         "rollout.prompts_per_step=4", "rollout.score_overlap_splits=3")
  _fails("score", "cpu", {"rollout.score_overlap_splits": 2}, "rollout.score_overlap_splits",
         "rollout.feedback='instruction'")
  _fails("score", "cpu", {"rollout.sample_batches": 3}, "rollout.prompts_per_step=4",
         "rollout.sample_batches=3")
  _fails("score", "cpu", {"mesh.data": 8, "rollout.sample_batches": 4}, "mesh.data",
         "rollout.sample_batches", "4 rows")
  _fails("score", "cpu", {"optim.micro_batches": 3}, "optim.micro_batches=3",
         "rollout.prompts_per_step x rollout.group_size")


def test_objectives_refuse_what_they_cannot_train_when_the_config_loads():
  _fails("score", "cpu", {"rollout.feedback": "unary"}, "rollout.feedback=instruction")
  _fails("score", "math", {"objective": "grpo", "sampler.temperature": 0.7},
         "sampler.temperature")
  _fails("score", "cpu", {"score.kl_estimator": "k1"}, "kl_in_reward")
  _fails("score", "cpu", {"score.stages": "I:3,III:3"}, "score.stages")
  _fails("score", "cpu", {"objective": "nope"}, "objective='nope'")
  _fails("score", "code", {"evaluate.checkpoint": "bestest"}, "evaluate.checkpoint")
  _fails("score", "cpu", {"evaluate.feedback": "loud"}, "evaluate.feedback")
  _fails("score", "cpu", {"task.name": "gsm9k"}, "task.name='gsm9k'")


def test_every_study_arm_is_checked_as_the_study_builds_it():
  message = _fails("study", "cpu", {"arms.score": "method=rl;objective=score;"
                                                  "rollout.feedback=unary"},
                   "arms.score", "rollout.feedback=instruction")
  assert message.startswith("arms.score: ")
  _fails("study", "gsm8k", {"arms.multi_turn_outcome": "method=rl;objective=grpo;"
                                                        "grpo.minibatches=3"},
         "arms.multi_turn_outcome", "grpo.minibatches=3")
  _fails("study", "cpu", {"study.arms": "base,nope"}, "no arm 'nope'")
