"""Every variant of every config file builds and passes the consistency checks at its
real size, and a config whose fields contradict each other fails when it is loaded,
naming the fields and the fix."""

import dataclasses
import importlib.util
import pathlib

import pytest

from jaxscore import config_checks, study

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECKS = {"score": config_checks.check_experiment,
          "self_explore": config_checks.check_self_explore,
          "study": study.check}


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
  message = _fails("self_explore", "gsm8k", {"rationales.batch_size": 64},
                   "rationales.batch_size=64", "rationales.group_size=100")
  assert "multiple of 100" in message
  _fails("self_explore", "cpu", {"explore.batch_size": 30}, "explore.batch_size=30",
         "explore.group_size=4")
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
  message = _fails("study", "cpu", {"arms.score": "objective=score;"
                                                  "rollout.feedback=unary"},
                   "arms.score", "rollout.feedback=instruction")
  assert message.startswith("arms.score: ")
  _fails("study", "gsm8k", {"arms.multi_turn_outcome": "objective=grpo;"
                                                        "grpo.minibatches=3"},
         "arms.multi_turn_outcome", "grpo.minibatches=3")
  _fails("study", "cpu", {"study.arms": "base,nope"}, "no arm 'nope'")


# ---------------------------------------------------------------------------
# One definition per default: every group is the dataclass it feeds.


def _groups(name: str) -> dict[str, type]:
  from jaxscore import config, study
  from jaxscore.self_explore import pipeline

  if name == "self_explore":
    return pipeline.GROUPS | config.objective_groups(("sft", "dpo"))
  out = config.GROUPS | config.objective_groups()
  return out | {"study": study.StudyConfig} if name == "study" else out


@pytest.mark.parametrize("name, arg", [
    (name, variant + option) for name in CHECKS for variant in _module(name).VARIANTS
    for option in ("", ",runlocal")])
def test_every_group_is_its_dataclass_but_for_the_fields_the_file_states(name, arg):
  from jaxscore import config

  module = _module(name)
  c, stated = module.get_config(arg), module.changes(arg)
  groups = _groups(name)
  scalars = {"seed", "format"} | ({"objective"} if name != "self_explore" else set())
  assert set(c) == set(groups) | scalars | ({"arms"} if name == "study" else set())
  for group, cls in groups.items():
    values, defaults = config.flatten(c[group].to_dict()), config.flatten(config.defaults(cls))
    assert set(values) == set(defaults), (group, cls)  # The group has the fields, no more.
    for key, default in defaults.items():
      if f"{group}.{key}" not in stated:
        assert values[key] == default, f"{group}.{key} differs from {cls.__name__}'s " \
            "default, but the config file does not state it"
  for key, value in stated.items():
    group, field = key.split(".", 1)
    assert config.flatten(c[group].to_dict())[field] == value, key


def test_an_objective_registered_anywhere_gets_its_group_in_every_config():
  from jaxscore import config, objectives
  from jaxscore.objectives import base

  @dataclasses.dataclass(frozen=True)
  class ClipConfig:
    num_steps: int = 7
    clip: float = 0.3  # A comment that lives here only.

  @objectives.register("test_clip")
  class Clip(objectives.OnlineObjective):
    Config = ClipConfig

  try:
    c = _config("score", "cpu")
    assert c.test_clip.to_dict() == {"num_steps": 7, "clip": 0.3}
    config.override(c, {"test_clip.clip": 0.1, "objective": "test_clip"})
    assert base.make_config(Clip, c.test_clip, "test_clip") == ClipConfig(7, 0.1)
    assert "test_clip" in _config("study", "cpu")
  finally:
    del base._REGISTRY["test_clip"]


def test_override_names_the_key_it_cannot_set():
  from jaxscore import config

  c = _config("score", "cpu")
  with pytest.raises(KeyError, match=r"config.optim.lerning_rate is not a field .*learning_rate"):
    config.override(c, {"optim.lerning_rate": 1.0})
  with pytest.raises(KeyError, match=r"config.optimizer is not a config group"):
    config.override(c, {"optimizer.learning_rate": 1.0})
  with pytest.raises(ValueError, match="unknown variant 'nope'"):
    _module("score").changes("nope")
  with pytest.raises(ValueError, match="unknown option 'fast'"):
    _module("self_explore").changes("cpu,fast")


def test_a_zero_schedule_length_is_the_runs_optimizer_updates():
  from jaxscore.loops import train

  oc = train.OptimConfig(schedule="linear", grad_accum_steps=2)
  # 10 GRPO rollout batches x (2 epochs x 2 minibatches) updates, every 2 accumulated.
  assert train.with_run_length(oc, 10, 4).total_steps == 20
  assert train.with_run_length(dataclasses.replace(oc, total_steps=7), 10, 4).total_steps == 7
  lr = train.learning_rate_schedule(train.with_run_length(oc, 10, 4))
  assert float(lr(0)) == pytest.approx(oc.learning_rate) and float(lr(20)) == 0.0
  assert float(lr(10)) == pytest.approx(oc.learning_rate / 2)
