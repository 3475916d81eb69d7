"""gs:// workdirs, against an in-memory object store that, like GCS, cannot append."""

import json
import os
import sys

import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem

from jaxscore import evaluate, sweep
from jaxscore.infra import checkpoint, files, metric_writers


class FakeGCS(MemoryFileSystem):
  protocol = ("gs", "gcs")

  def __init__(self, *args, finalize_on_close=False, **kwargs):
    del finalize_on_close
    super().__init__(*args, **kwargs)

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode:
      raise NotImplementedError("object stores cannot append")
    return super()._open(path, mode, **kwargs)


@pytest.fixture
def gcs(monkeypatch):
  # pylint: disable=protected-access
  if epath.Path("gs://bucket")._backend is not epath.backend.fsspec_backend:
    pytest.skip("epath routes gs:// through TensorFlow here")
  for p in ("gs", "gcs"):
    monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, p, FakeGCS)
  get_filesystem = epath.backend.fsspec_backend._get_filesystem
  get_filesystem.cache_clear()
  monkeypatch.setattr(FakeGCS, "store", {})
  monkeypatch.setattr(FakeGCS, "pseudo_dirs", [""])
  yield FakeGCS()
  get_filesystem.cache_clear()


def test_paths_keep_uris_and_make_local_paths_absolute():
  assert os.fspath(files.path("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"
  assert os.fspath(files.path("runs/x")) == os.path.abspath("runs/x")


def test_metrics_transcripts_reports_and_summary_on_gs(gcs):
  workdir = files.path("gs://bucket/run")
  writer = metric_writers.MetricsWriter(workdir)
  for step in (1, 2, 3):
    writer.write(step, {"reward": step / 10, "stage": "I"})
  assert not gcs.exists("gs://bucket/run/metrics.jsonl")  # Held until the checkpoint.
  writer.flush()
  writer.write(4, {"reward": 0.4, "stage": "II"})
  writer.close()
  lines = [json.loads(l) for l in gcs.cat("gs://bucket/run/metrics.jsonl").splitlines()]
  assert [m["step"] for m in lines] == [1, 2, 3, 4] and lines[-1]["stage"] == "II"

  files.append_text(workdir / "transcripts.jsonl", "a\n")
  files.append_text(workdir / "transcripts.jsonl", "b\n")
  assert gcs.cat("gs://bucket/run/transcripts.jsonl") == b"a\nb\n"

  result = {"acc@t1": 0.25, "acc@t2": 0.5}
  evaluate.write_report("gs://bucket/run/eval", "after", result, [{"id": "p0"}])
  saved = json.loads(gcs.cat("gs://bucket/run/eval/after.json"))
  assert saved["metrics"] == result and saved["transcripts"] == [{"id": "p0"}]
  assert gcs.cat("gs://bucket/run/eval/after.png")[:8] == b"\x89PNG\r\n\x1a\n"

  (files.path("gs://bucket/sweep/score.alpha=1.0") / "report.json").write_text(
      json.dumps({"after SCoRe": {"acc@t2": 0.75}}))
  table = sweep.summary("gs://bucket/sweep", [{"score.alpha": 1.0}, {"score.alpha": 10.0}])
  assert "| score.alpha=1.0 | 0.75 |" in table and "| score.alpha=10.0 | - |" in table


def test_checkpointer_hands_orbax_the_gs_uri(monkeypatch):
  seen = []

  class Recorder:
    def __init__(self, directory, **kwargs):
      del kwargs
      seen.append(directory)

  monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", Recorder)
  checkpoint.Checkpointer("gs://bucket/run/checkpoints")
  assert os.fspath(seen[0]) == "gs://bucket/run/checkpoints"  # Not "gs:/bucket/...".


def test_local_appends_go_straight_to_disk(tmp_path):
  writer = metric_writers.MetricsWriter(files.path(tmp_path))
  writer.write(1, {"reward": 0.5})
  assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "reward": 0.5}
  writer.close()


def test_resuming_drops_records_logged_after_the_last_checkpoint(tmp_path):
  # A crash after step 5 with the last checkpoint at step 3: steps 4 and 5 run again.
  workdir = files.path(tmp_path)
  writer = metric_writers.MetricsWriter(workdir)
  for step in range(1, 6):
    writer.write(step, {"reward": float(step)})
  writer.close()
  files.append_text(workdir / "transcripts.jsonl",
                    "".join(json.dumps({"step": s, "id": "p"}) + "\n" for s in (3, 5)))
  writer = metric_writers.MetricsWriter(workdir, start_step=3)
  writer.write(4, {"reward": 40.0})
  writer.close()
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(m["step"], m["reward"]) for m in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
  transcripts = (tmp_path / "transcripts.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in transcripts] == [3]
