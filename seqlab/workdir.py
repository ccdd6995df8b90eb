"""Work-directory paths that may be local or in cloud storage (`gs://`, `s3://`, `az://`).

A run's work directory holds checkpoints (orbax, which writes `gs://` natively), `config.json`,
`metrics.jsonl` and TensorBoard events. Local paths are made absolute; a URL is kept as it is
and read / written through `etils.epath` (fsspec: `gcsfs` for `gs://`, `s3fs` for `s3://`).
Object stores cannot append, so `monitor.MetricWriter` writes its files in a local scratch
directory and mirrors them to a remote work directory (see there).
"""

from __future__ import annotations

import os

from etils import epath

URL_PREFIXES = ("gs://", "s3://", "az://")


def is_remote(path: str | os.PathLike) -> bool:
  """True for a cloud-storage URL (`gs://bucket/...`)."""
  return os.fspath(path).startswith(URL_PREFIXES)


def resolve(path: str | os.PathLike) -> str:
  """An absolute local path, or the URL unchanged (os.path.abspath would mangle `gs://b`)."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def join(path: str | os.PathLike, *names: str) -> str:
  """`path/names...` for local paths and URLs alike."""
  return os.fspath(epath.Path(os.fspath(path)).joinpath(*names)) if is_remote(path) else \
      os.path.join(os.fspath(path), *names)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path`, creating its parent directories."""
  p = epath.Path(os.fspath(path))
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_text(text)


def read_text(path: str | os.PathLike) -> str:
  return epath.Path(os.fspath(path)).read_text()


def isfile(path: str | os.PathLike) -> bool:
  p = epath.Path(os.fspath(path))
  return p.exists() and not p.is_dir()


def isdir(path: str | os.PathLike) -> bool:
  return epath.Path(os.fspath(path)).is_dir()


def copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
  """Copies one file (local or remote) over `target`."""
  epath.Path(os.fspath(source)).copy(epath.Path(os.fspath(target)), overwrite=True)


def rename(source: str | os.PathLike, target: str | os.PathLike) -> None:
  epath.Path(os.fspath(source)).rename(epath.Path(os.fspath(target)))


def makedirs(path: str | os.PathLike) -> None:
  """Creates the directory `path` and its parents (a no-op if it exists)."""
  epath.Path(os.fspath(path)).mkdir(parents=True, exist_ok=True)
