"""Atomic, content-keyed storage for tokenized corpora, trained tokenizers and saved tokenizers.

An entry is written into a temporary sibling folder and renamed into place in one step, so an
entry that exists is complete: a crash mid-write leaves only a `.tmp-*` folder that nothing
reads (and that a later write sweeps away once it is old).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Any, Iterator

DEFAULT_DIR = '~/.cache/lm'
TMP_PREFIX = '.tmp-'
_STALE_SECONDS = 24 * 3600  # a temporary folder this old belongs to a crashed writer


def root(cache_dir: str) -> str:
  """`data.cache_dir`, or ~/.cache/lm when it is empty."""
  return os.path.abspath(os.path.expanduser(cache_dir or DEFAULT_DIR))


def key(*parts: Any) -> str:
  """A short digest of JSON-able parts: equal parts, equal key."""
  text = json.dumps(parts, sort_keys=True, separators=(',', ':'))
  return hashlib.sha256(text.encode()).hexdigest()[:32]


@contextlib.contextmanager
def atomic_directory(final: str, replace: bool = False) -> Iterator[str]:
  """Yields an empty temporary folder that becomes `final` when the block succeeds.

  On failure the temporary folder is removed. If `final` appeared meanwhile (another process
  wrote the same entry) it is kept unless `replace`, and ours is dropped.
  """
  parent = os.path.dirname(os.path.abspath(final))
  os.makedirs(parent, exist_ok=True)
  _sweep_stale(parent)
  tmp = tempfile.mkdtemp(prefix=f'{TMP_PREFIX}{os.path.basename(final)}-', dir=parent)
  try:
    yield tmp
    _fsync_tree(tmp)
    if replace and os.path.exists(final):
      old = tempfile.mkdtemp(prefix=f'{TMP_PREFIX}old-', dir=parent)
      os.rename(final, os.path.join(old, 'entry'))
      os.rename(tmp, final)
      shutil.rmtree(old, ignore_errors=True)
    else:
      try:
        os.rename(tmp, final)
      except OSError:
        if not os.path.isdir(final):
          raise
        shutil.rmtree(tmp, ignore_errors=True)  # another writer won the race with the same entry
    _fsync_dir(parent)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_json(path: str, value: Any) -> None:
  with open(path, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write('\n')


def _sweep_stale(parent: str) -> None:
  now = time.time()
  for name in os.listdir(parent):
    path = os.path.join(parent, name)
    if name.startswith(TMP_PREFIX):
      with contextlib.suppress(OSError):
        if now - os.path.getmtime(path) > _STALE_SECONDS:
          shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(folder: str) -> None:
  for dirpath, _, filenames in os.walk(folder):
    for filename in filenames:
      with open(os.path.join(dirpath, filename), 'rb') as f:
        os.fsync(f.fileno())
    _fsync_dir(dirpath)


def _fsync_dir(folder: str) -> None:
  with contextlib.suppress(OSError):  # not every platform can open a folder
    fd = os.open(folder, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
