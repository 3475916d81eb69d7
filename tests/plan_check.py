"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_plan.py).

Every variant of every config file goes through `jaxscore plan` on 8 fake devices, at the
variant's real batch sizes, sequence lengths and mesh. The model is a tiny one (a
config.json written here, 2 layers of width 64, the embedded model's tokenizer) because
compiling the embedded 135M model's paper-size steps for every study arm takes minutes
on 2 cores; `jaxscore plan --model` plans the real models the same way.
"""

import importlib.util
import json
import pathlib
import sys
import tempfile

import jax

from jaxscore import plan

assert jax.device_count() == 8, jax.devices()
ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = ("score.py", "study.py", "self_explore.py")


def variants(file: str) -> tuple[str, ...]:
  """The variants a config file declares (its VARIANTS)."""
  spec = importlib.util.spec_from_file_location(file[:-3], ROOT / "configs" / file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.VARIANTS


VARIANTS = {file: variants(file) for file in FILES}

tiny = pathlib.Path(tempfile.mkdtemp()) / "tiny"
tiny.mkdir()
(tiny / "config.json").write_text(json.dumps(dict(
    model_type="qwen3", vocab_size=49_152, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)))
only = sys.argv[1:]
for file, variants in VARIANTS.items():
  for variant in variants:
    name = f"configs/{file}:{variant}"
    if only and name not in only:
      continue
    c = plan.load_config(str(ROOT / "configs" / file) + f":{variant}")
    p = plan.make_plan(c, name, hbm_gib=16.0, model=str(tiny))
    text = p.render(c)
    assert text.splitlines()[-1].startswith(("fits:", "does not fit:")), text
    for program in p.programs:
      assert program.phases and all(phase.total > 0 for phase in program.phases), program
    print(f"OK {name} programs={len(p.programs)} peak_gib={p.peak[1].peak / 2**30:.3f} "
          f"fits={p.fits} prompts={p.prompt}", flush=True)
