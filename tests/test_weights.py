"""Weights in and out against transformers (PyTorch) and the gguf package."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import report_parity, require_torch
from hf_tiny import FAMILIES, SLIDING, hf_logits, make_hf_model, padded_batch

from jaxscore.models import gguf_checkpoint, hf_checkpoint, weights
from jaxscore.models import model as model_lib


def _jax_logits(cfg, params, tokens, mask):
  logits, _ = model_lib.apply(jax.tree.map(np.asarray, params), tokens, cfg, mask_BxT=mask)
  return np.asarray(logits)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_import_matches_transformers_on_padded_batch(family, tmp_path):
  require_torch()
  hf = make_hf_model(family)
  # A small shard size exercises model.safetensors.index.json.
  hf.save_pretrained(tmp_path, max_shard_size="100KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  cfg, params = hf_checkpoint.load_hf(tmp_path)
  assert (cfg.rope_scaling is not None) == (family in ("llama3-rope", "gemma3"))
  assert (cfg.sliding_window is not None) == (family in SLIDING)
  tokens, mask = padded_batch(cfg.vocab_size)
  ours = _jax_logits(cfg, params, tokens, mask)
  ref = hf_logits(hf, tokens, mask)
  valid = mask.astype(bool)
  diff = np.abs(ours - ref)[valid].max()
  report_parity(f"import {family} (fp32, padded batch)", diff, 1e-4)
  assert diff <= 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "llama3-rope", "qwen3",
                                    "gemma2", "gemma3"])
def test_export_round_trip_through_transformers(family, tmp_path):
  torch = require_torch()
  import transformers

  cfg, _ = hf_checkpoint.load_hf(_saved(family, tmp_path / "src"))
  params = jax.tree.map(np.asarray, model_lib.init(cfg, jax.random.key(3), stddev=0.2))
  hf_checkpoint.save_hf(tmp_path / "out", cfg, params)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "out", dtype=torch.float32, attn_implementation="eager")
  tokens, mask = padded_batch(cfg.vocab_size, seed=1)
  ours = _jax_logits(cfg, params, tokens, mask)
  ref = hf_logits(hf, tokens, mask)
  diff = np.abs(ours - ref)[mask.astype(bool)].max()
  report_parity(f"export {family} -> transformers", diff, 1e-4)
  assert diff <= 1e-4
  cfg2, params2 = hf_checkpoint.load_hf(tmp_path / "out")
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_export_bfloat16_loads_in_transformers(tmp_path):
  torch = require_torch()
  import transformers

  cfg = model_lib.ModelConfig(vocab_size=50, num_layers=1, embed_dim=16, num_heads=2,
                              num_kv_heads=1, mlp_dim=24)
  params = jax.tree.map(np.asarray, model_lib.init(cfg, jax.random.key(0)))
  hf_checkpoint.save_hf(tmp_path, cfg, params, dtype="bfloat16")
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
  assert hf.model.embed_tokens.weight.dtype == torch.bfloat16


def _saved(family, path):
  make_hf_model(family).save_pretrained(path)
  return path


# ---------------------------------------------------------------------------
# Bad input.


def _tiny_dir(tmp_path):
  require_torch()
  return _saved("llama", tmp_path / "ckpt")


def test_missing_tensor_is_named(tmp_path):
  from safetensors.numpy import load_file, save_file

  path = _tiny_dir(tmp_path)
  tensors = load_file(path / "model.safetensors")
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, path / "model.safetensors")
  with pytest.raises(weights.CheckpointError,
                     match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
    hf_checkpoint.load_hf(path)


def test_wrong_shape_is_named(tmp_path):
  from safetensors.numpy import load_file, save_file

  path = _tiny_dir(tmp_path)
  tensors = load_file(path / "model.safetensors")
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, 64), np.float32)
  save_file(tensors, path / "model.safetensors")
  with pytest.raises(weights.CheckpointError,
                     match=r"k_proj\.weight' has shape \(3, 64\), expected \(32, 64\)"):
    hf_checkpoint.load_hf(path)


def test_unsupported_architecture_is_named(tmp_path):
  path = _tiny_dir(tmp_path)
  config = json.loads((path / "config.json").read_text())
  config["model_type"] = "gpt_neox"
  (path / "config.json").write_text(json.dumps(config))
  with pytest.raises(weights.CheckpointError, match=r"config\.json: model_type='gpt_neox'"):
    hf_checkpoint.load_hf(path)


def test_index_listing_a_missing_shard_is_named(tmp_path):
  require_torch()
  make_hf_model("llama").save_pretrained(tmp_path, max_shard_size="100KB")
  shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
  shard.unlink()
  with pytest.raises(weights.CheckpointError, match=shard.name):
    hf_checkpoint.load_hf(tmp_path)


def test_non_finite_tensor_is_named_with_its_file(tmp_path):
  from safetensors.numpy import load_file, save_file

  path = _tiny_dir(tmp_path)
  tensors = load_file(path / "model.safetensors")
  tensors["model.layers.0.mlp.down_proj.weight"][1, 2] = np.nan
  save_file(tensors, path / "model.safetensors")
  with pytest.raises(weights.CheckpointError,
                     match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.down_proj"
                           r"\.weight' has 1 non-finite values"):
    hf_checkpoint.load_hf(path)


def test_truncated_safetensors_and_config_missing_a_field_are_named(tmp_path):
  path = _tiny_dir(tmp_path)
  config = json.loads((path / "config.json").read_text())
  del config["hidden_size"]
  (path / "config.json").write_text(json.dumps(config))
  with pytest.raises(weights.CheckpointError, match=r"config\.json: missing field 'hidden_size'"):
    hf_checkpoint.load_hf(path)
  path = _tiny_dir(tmp_path / "again")
  shard = path / "model.safetensors"
  shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
  with pytest.raises(weights.CheckpointError,
                     match=r"model\.safetensors: (not a readable|cannot read)"):
    hf_checkpoint.load_hf(path)


def test_duplicate_tensor_across_shards_is_named(tmp_path):
  from safetensors.numpy import load_file, save_file

  path = _tiny_dir(tmp_path)
  tensors = load_file(path / "model.safetensors")
  extra = {"model.norm.weight": tensors["model.norm.weight"]}
  save_file(extra, path / "model-extra.safetensors")
  with pytest.raises(weights.CheckpointError, match=r"tensor 'model\.norm\.weight' is also in"):
    hf_checkpoint.load_hf(path)
  # And in an index listing one name twice.
  index = {"weight_map": {"model.norm.weight": "model.safetensors"}}
  text = json.dumps(index)[:-2] + ', "model.norm.weight": "model-extra.safetensors"}}'
  (path / "model.safetensors.index.json").write_text(text)
  with pytest.raises(weights.CheckpointError,
                     match=r"index\.json: tensor 'model\.norm\.weight' is listed twice"):
    hf_checkpoint.load_hf(path)


# ---------------------------------------------------------------------------
# GGUF, written here with llama.cpp's Q/K row permutation.


def _llama_cpp_permute(w, n_head):
  """llama.cpp's convert_hf_to_gguf.py permutation of Q/K rows."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _write_gguf(path, cfg, params, drop=()):
  import gguf

  hf = weights.params_to_tensors(params, cfg)
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(cfg.num_layers)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.embed_dim)
  writer.add_feed_forward_length(cfg.mlp_dim)
  writer.add_head_count(cfg.num_heads)
  writer.add_head_count_kv(cfg.num_kv_heads)
  writer.add_rope_freq_base(cfg.rope_theta)
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  writer.add_vocab_size(cfg.vocab_size)
  names = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
  layer = {"input_layernorm.weight": "attn_norm.weight",
           "post_attention_layernorm.weight": "ffn_norm.weight",
           "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
           "self_attn.v_proj.weight": "attn_v.weight",
           "self_attn.o_proj.weight": "attn_output.weight",
           "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
           "mlp.down_proj.weight": "ffn_down.weight"}
  for name, w in hf.items():
    if name in names:
      gname = names[name]
    else:
      _, _, i, rest = name.split(".", 3)
      gname = f"blk.{i}.{layer[rest]}"
      if rest == "self_attn.q_proj.weight":
        w = _llama_cpp_permute(w, cfg.num_heads)
      elif rest == "self_attn.k_proj.weight":
        w = _llama_cpp_permute(w, cfg.num_kv_heads)
    if gname not in drop:
      writer.add_tensor(gname, np.ascontiguousarray(w, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


GGUF_CFG = model_lib.ModelConfig(vocab_size=61, num_layers=2, embed_dim=32, num_heads=4,
                                 num_kv_heads=2, mlp_dim=40, rope_theta=10_000.0,
                                 max_position_embeddings=128)


def test_gguf_import_undoes_the_qk_permutation(tmp_path):
  params = jax.tree.map(np.asarray, model_lib.init(GGUF_CFG, jax.random.key(0)))
  _write_gguf(tmp_path / "m.gguf", GGUF_CFG, params)
  cfg, loaded = gguf_checkpoint.load_gguf(tmp_path / "m.gguf")
  # GGUF stores the epsilon as float32.
  assert cfg == GGUF_CFG.replace(rms_norm_eps=float(np.float32(GGUF_CFG.rms_norm_eps)))
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_gguf_missing_tensor_is_named_by_its_gguf_name(tmp_path):
  params = jax.tree.map(np.asarray, model_lib.init(GGUF_CFG, jax.random.key(0)))
  _write_gguf(tmp_path / "m.gguf", GGUF_CFG, params, drop=("blk.1.ffn_up.weight",))
  with pytest.raises(weights.CheckpointError,
                     match=r"m\.gguf: missing tensor 'blk\.1\.ffn_up\.weight'"):
    gguf_checkpoint.load_gguf(tmp_path / "m.gguf")


def test_gguf_non_finite_tensor_is_named(tmp_path):
  params = jax.tree.map(np.array, model_lib.init(GGUF_CFG, jax.random.key(0)))
  params["layers"]["up"][1, 0, 3] = np.inf
  _write_gguf(tmp_path / "m.gguf", GGUF_CFG, params)
  with pytest.raises(weights.CheckpointError,
                     match=r"m\.gguf: tensor 'blk\.1\.ffn_up\.weight' has 1 non-finite values"):
    gguf_checkpoint.load_gguf(tmp_path / "m.gguf")


@pytest.mark.parametrize("corruption", ["truncated", "garbage"])
def test_corrupt_gguf_is_named(tmp_path, corruption):
  params = jax.tree.map(np.asarray, model_lib.init(GGUF_CFG, jax.random.key(0)))
  path = tmp_path / "m.gguf"
  _write_gguf(path, GGUF_CFG, params)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 3] if corruption == "truncated" else b"NOPE" + data[4:])
  with pytest.raises(weights.CheckpointError, match=r"m\.gguf: not a readable GGUF file"):
    gguf_checkpoint.load_gguf(path)


def test_a_hub_id_loads_from_the_hugging_face_cache_offline(tmp_path):
  """`org/name[@revision]` resolves through huggingface_hub's cache: a cache laid out
  here as the hub writes it (refs/main -> snapshots/<commit>), read with
  HF_HUB_OFFLINE=1; a model missing from the cache is one clear line."""
  import subprocess
  import sys

  from hf_tiny import chat_tokenizer

  from jaxscore.models import hf_checkpoint

  cfg = weights.config_from_hf(dict(model_type="qwen3", vocab_size=300, hidden_size=32,
                                    intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=8))
  params = model_lib.init(cfg, jax.random.key(0), stddev=0.3)
  commit = "0123456789abcdef0123456789abcdef01234567"
  repo = tmp_path / "hf" / "hub" / "models--acme--tiny-chat"
  snapshot = repo / "snapshots" / commit
  hf_checkpoint.save_hf(snapshot, cfg, jax.tree.map(np.asarray, params),
                        tokenizer=chat_tokenizer("qwen3"))
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text(commit)
  np.save(tmp_path / "tokens.npy", np.arange(12).reshape(2, 6))
  script = f"""
import numpy as np
from jaxscore.models import model, pretrained
for name in ("acme/tiny-chat", "acme/tiny-chat@{commit}"):
  m = pretrained.load(name)
  assert str(m.path).endswith("{commit}"), m.path
  logits, _ = model.apply(m.params, np.load({str(tmp_path / 'tokens.npy')!r}), m.cfg)
  np.save({str(tmp_path / 'logits.npy')!r}, np.asarray(logits))
  print("OK", name, m.cfg.family, m.tokenizer.eos_token)
try:
  pretrained.resolve("acme/not-cached")
except FileNotFoundError as e:
  print("ERR", e)
"""
  env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  env.pop("HF_HUB_CACHE", None)
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "OK acme/tiny-chat qwen3 <|im_end|>" in out.stdout
  assert f"OK acme/tiny-chat@{commit} qwen3" in out.stdout
  ours = np.asarray(model_lib.apply(params, jnp.arange(12).reshape(2, 6), cfg)[0])
  np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), ours, rtol=1e-5, atol=1e-5)
  assert "ERR 'acme/not-cached' is not in the Hugging Face cache" in out.stdout


def _exported(tmp_path):
  out = tmp_path / "exported"
  (out / "base").mkdir(parents=True)
  for name in ("config.json", "model.safetensors", "tokenizer.json", "base/model.safetensors"):
    (out / name).write_text(name)
  (out / "jaxscore_export.json").write_text(json.dumps(
      {"step": 40, "which": "best", "base_model": "smollm2-135m-instruct"}))
  return out


def test_push_to_hub_uploads_the_export_without_a_local_base(tmp_path, monkeypatch):
  import huggingface_hub

  from jaxscore import export

  calls = {}
  monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                      lambda self, repo_id, **kw: calls.setdefault("create", (repo_id, kw)))

  def upload_folder(self, *, repo_id, folder_path, ignore_patterns, commit_message, **kw):
    files = sorted(str(p.relative_to(folder_path)) for p in
                   pathlib.Path(folder_path).rglob("*") if p.is_file()
                   and not any(p.relative_to(folder_path).match(g) for g in ignore_patterns))
    calls["upload"] = (repo_id, files, commit_message)
    return huggingface_hub.CommitInfo(
        commit_url=f"https://huggingface.co/{repo_id}/commit/abc", commit_message="",
        commit_description="", oid="abc")

  monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
  out = _exported(tmp_path)
  assert export.push_to_hub(out, "me/score-cpu") == "https://huggingface.co/me/score-cpu/commit/abc"
  assert calls["create"] == ("me/score-cpu", {"repo_type": "model", "private": True,
                                               "exist_ok": True})
  repo, files, message = calls["upload"]
  assert files == ["config.json", "jaxscore_export.json", "model.safetensors",
                   "tokenizer.json"]
  assert message == "jaxscore export: step 40 (best) of smollm2-135m-instruct"
  with pytest.raises(export.ExportError, match="expected a repository id org/name"):
    export.push_to_hub(out, "score-cpu")


def test_push_to_hub_offline_is_a_clear_error(tmp_path, monkeypatch):
  from huggingface_hub import constants

  from jaxscore import export

  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  with pytest.raises(export.ExportError, match="HF_HUB_OFFLINE is set; unset it to upload"):
    export.push_to_hub(_exported(tmp_path), "me/score-cpu")
