"""Cloud-storage work directories: `gs://` URLs stay URLs and the run's files reach them.

There is no bucket here: an in-memory fsspec file system is registered for the `gs` / `gcs`
protocols, which is what `etils.epath` (and so `seqlab.workdir`) uses to reach `gs://` paths.
orbax's own `gs://` writes go through tensorstore's GCS driver and need a real bucket; the
test checks that the checkpoint manager receives the URL unmangled.
"""

import json

import fsspec
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem

from seqlab import checkpoint, loop, monitor
from seqlab import workdir as workdir_lib


class _FakeGCS(MemoryFileSystem):
  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]

  def __init__(self, *args, finalize_on_close=None, **kwargs):  # gcsfs's keyword, unused
    del finalize_on_close
    super().__init__(*args, **kwargs)


@pytest.fixture
def bucket():
  for name in ("gs", "gcs"):
    fsspec.register_implementation(name, _FakeGCS, clobber=True)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  _FakeGCS.store.clear()
  yield "gs://bucket/runs/r1"
  _FakeGCS.store.clear()


def test_urls_are_kept_and_joined():
  assert workdir_lib.resolve("gs://bucket/a") == "gs://bucket/a"
  assert workdir_lib.join("gs://bucket/a", "checkpoints", "3") == "gs://bucket/a/checkpoints/3"
  assert workdir_lib.resolve("rel/dir").endswith("/rel/dir")
  assert workdir_lib.resolve("rel/dir").startswith("/")


def test_metric_writer_mirrors_and_resumes_on_a_bucket(bucket):
  writer = monitor.MetricWriter(bucket, mirror_every_s=0)
  writer.write(1, {"loss": 2.5})
  # mirrored at once (mirror_every_s=0): readable remotely while the run goes on
  remote = epath.Path(workdir_lib.join(bucket, "metrics.jsonl"))
  assert [json.loads(x) for x in remote.read_text().splitlines()] == [{"step": 1, "loss": 2.5}]
  writer.write(2, {"loss": 2.0})
  writer.close()
  events = list(epath.Path(workdir_lib.join(bucket, "tensorboard")).iterdir())
  assert len(events) == 1 and events[0].name.startswith("events.out.tfevents")
  assert events[0].stat().length > 0
  # A run resumed at step 2 keeps what the first one wrote (object stores cannot append).
  writer = monitor.MetricWriter(bucket, resume_step=2, mirror_every_s=3600)
  writer.write(3, {"loss": 1.5})
  assert len(remote.read_text().splitlines()) == 2  # not mirrored yet
  writer.close()  # ... but always at close
  assert [json.loads(x)["step"] for x in remote.read_text().splitlines()] == [1, 2, 3]


def test_saved_config_is_read_from_a_bucket(bucket):
  with pytest.raises(ValueError, match="has no config.json"):
    loop.saved_config(bucket)
  workdir_lib.write_text(workdir_lib.join(bucket, "config.json"),
                         json.dumps({"seed": 7, "model": {"preset": "gpt-tiny"}}))
  config = loop.saved_config(bucket)
  assert config.seed == 7 and config.model.preset == "gpt-tiny"


def test_checkpointer_hands_orbax_the_url(bucket, monkeypatch):
  seen = {}

  class Manager:
    def __init__(self, directory, **kwargs):
      seen["directory"] = directory

  monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", Manager)
  ckpt = checkpoint.Checkpointer(workdir_lib.join(bucket, "checkpoints"))
  # os.path.abspath would have made it "<cwd>/gs:/bucket/runs/r1/checkpoints"
  assert seen["directory"] == ckpt.directory == "gs://bucket/runs/r1/checkpoints"
  assert checkpoint.read_config(workdir_lib.join(bucket, "nothing-here")) is None
