"""`hyperlora_jax.files`: atomic writes, manifests that catch changed bytes, stale partial
directories, and a lock under which concurrent read-merge-writes lose nothing."""

import json
import multiprocessing
import os
import subprocess
import sys

import pytest

from hyperlora_jax import files


def test_an_atomic_write_is_whole_or_not_at_all(tmp_path, monkeypatch):
  path = tmp_path / "config.json"
  files.atomic_write_json(str(path), {"a": 1})
  assert json.loads(path.read_text()) == {"a": 1}
  files.atomic_write(str(path), "second")
  assert path.read_text() == "second" and os.listdir(tmp_path) == ["config.json"]  # No temporary file left.

  def interrupted(src, dst):
    raise KeyboardInterrupt  # A kill between writing and renaming.

  monkeypatch.setattr(os, "replace", interrupted)
  with pytest.raises(KeyboardInterrupt):
    files.atomic_write(str(path), "third")
  assert path.read_text() == "second"  # The reader still finds the previous file whole.


def test_a_manifest_names_a_file_whose_bytes_changed_at_the_same_size(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "a.bin").write_bytes(bytes(range(256)) * 8)
  (tmp_path / "sub" / "b.json").write_text('{"x": 1}')
  manifest = files.write_manifest(str(tmp_path))
  assert set(manifest["files"]) == {"a.bin", "sub/b.json"}
  files.verify_manifest(str(tmp_path))
  with open(tmp_path / "a.bin", "r+b") as f:  # Random bytes, same size: only a checksum sees them.
    f.seek(100)
    f.write(os.urandom(16))
  with pytest.raises(files.IntegrityError, match=r"a.bin: its content changed since it was written"):
    files.verify_manifest(str(tmp_path))
  (tmp_path / "a.bin").write_bytes(b"short")
  with pytest.raises(files.IntegrityError, match=r"a.bin: 5 bytes, 2048 were written"):
    files.verify_manifest(str(tmp_path))
  os.remove(tmp_path / "sub" / "b.json")
  os.remove(tmp_path / "a.bin")
  with pytest.raises(files.IntegrityError, match=r"a.bin: missing"):
    files.verify_manifest(str(tmp_path))
  os.remove(tmp_path / files.MANIFEST_FILE)
  with pytest.raises(files.IntegrityError, match=r"no manifest.sha256.json"):
    files.verify_manifest(str(tmp_path))


def test_partial_directories_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
  target = str(tmp_path / "decoder-abc")
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  dead_partial = files.partial_path(target).rsplit("-", 1)[0] + f"-{int(dead.stdout)}"
  os.makedirs(dead_partial)
  mine = files.partial_path(target)
  os.makedirs(mine)
  other_host = f"{target}.partial-elsewhere-{int(dead.stdout)}"  # A shared filesystem: not ours to judge.
  os.makedirs(other_host)
  assert files.remove_stale_partials(target) == [dead_partial]
  assert os.path.isdir(mine) and os.path.isdir(other_host) and not os.path.exists(dead_partial)


def _add_entries(path: str, worker: int, count: int) -> None:
  for i in range(count):
    with files.exclusive_lock(path):
      entries = json.load(open(path)) if os.path.exists(path) else []
      files.atomic_write_json(path, entries + [f"{worker}-{i}"])


def test_read_merge_writes_under_the_lock_lose_no_entry(tmp_path):
  """Two processes read-merge-writing one index.json under the lock lose no entry."""
  path = str(tmp_path / "index.json")
  context = multiprocessing.get_context("spawn")
  workers = [context.Process(target=_add_entries, args=(path, w, 25)) for w in range(2)]
  for w in workers:
    w.start()
  for w in workers:
    w.join()
  assert sorted(json.load(open(path))) == sorted(f"{w}-{i}" for w in range(2) for i in range(25))
