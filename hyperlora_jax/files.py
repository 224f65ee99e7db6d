"""Files a resume or a cache reads: atomic writes, content manifests, an exclusive lock.

    files.atomic_write_json(path, record)     # whole or not at all, even on kill -9 or power loss
    files.write_manifest(directory)           # every file's sha256, written last
    files.verify_manifest(directory)          # raises IntegrityError naming the file that changed
    with files.exclusive_lock(path): ...      # one process at a time (read, merge, write)
    files.build_directory(target, write)      # a cache whole or not at all, its manifest last

A cache directory is built under a temporary name, its manifest written last, then renamed
into place: a directory with a manifest is complete, and verifying it on read catches any later
change of its bytes (random bytes of the same size included). A file that does not match is
reported by name; nothing here deletes or rebuilds a user's files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
from typing import Any, TypeVar
from collections.abc import Callable, Iterator

MANIFEST_FILE = "manifest.sha256.json"
T = TypeVar("T")
_CHUNK = 1 << 20


class IntegrityError(ValueError):
  """A file or directory is not what was written (named in the message)."""


def _fsync_directory(directory: str) -> None:
  try:
    fd = os.open(directory or ".", os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:  # Some filesystems cannot sync a directory; the rename is still atomic.
    pass
  finally:
    os.close(fd)


def atomic_write(path: str, data: bytes | str) -> None:
  """Writes `data` to `path` whole or not at all: a temporary file in the same directory,
  flushed and fsynced, renamed over `path`, then the directory fsynced.

  Args:
    path: the file to (re)write.
    data: its whole content (str: UTF-8).
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  payload = data if isinstance(data, bytes) else data.encode("utf-8")
  fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(payload)
      f.flush()
      os.fsync(f.fileno())
  except BaseException:
    os.unlink(temporary)
    raise
  os.replace(temporary, path)
  _fsync_directory(directory)


def atomic_write_json(path: str, value: Any, **dump_kwargs) -> None:
  """`atomic_write` of `json.dumps(value, **dump_kwargs)`.

  Args:
    path: the file to (re)write.
    value: any JSON-able value.
    dump_kwargs: `json.dumps` options (e.g. indent=2).
  """
  atomic_write(path, json.dumps(value, **dump_kwargs))


def file_sha256(path: str) -> str:
  """The sha256 hex digest of a file's bytes (read 1 MiB at a time).

  Args:
    path: a file.
  Returns:
    64 hex characters.
  """
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_CHUNK), b""):
      digest.update(block)
  return digest.hexdigest()


def _files_under(directory: str, manifest: str) -> list[str]:
  found = []
  for root, _, names in os.walk(directory):
    for name in names:
      relative = os.path.relpath(os.path.join(root, name), directory)
      if relative != manifest:
        found.append(relative)
  return sorted(found)


def write_manifest(directory: str, name: str = MANIFEST_FILE) -> dict:
  """Writes `directory/name`: {"files": {relative path: {"bytes", "sha256"}}} of every file under
  `directory` (fsynced first), atomically. Call it last, when the directory is complete.

  Args:
    directory: the complete directory.
    name: the manifest's file name.
  Returns:
    The manifest written.
  """
  entries = {}
  for relative in _files_under(directory, name):
    path = os.path.join(directory, relative)
    with open(path, "rb") as f:
      os.fsync(f.fileno())
    entries[relative] = {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}
  manifest = {"files": entries}
  atomic_write_json(os.path.join(directory, name), manifest, indent=1, sort_keys=True)
  return manifest


def verify_manifest(directory: str, name: str = MANIFEST_FILE) -> dict:
  """Checks every file `directory/name` lists: present, of its size and sha256. Returns the
  manifest.

  Args:
    directory: a directory `write_manifest` completed.
    name: the manifest's file name.
  Raises:
    IntegrityError: no readable manifest (an interrupted write, or written by a version that
      kept none), or a listed file missing or changed (each named).
  """
  path = os.path.join(directory, name)
  try:
    with open(path) as f:
      manifest = json.load(f)
    entries = manifest["files"]
  except FileNotFoundError:
    raise IntegrityError(
      f"{directory}: no {name}, so its files cannot be checked (an interrupted write, or a "
      f"version that kept no checksums)"
    ) from None
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise IntegrityError(f"{path}: not a readable manifest ({type(e).__name__}: {e})") from None
  for relative, entry in sorted(entries.items()):
    file = os.path.join(directory, relative)
    if not os.path.isfile(file):
      raise IntegrityError(f"{file}: missing (listed in {name})")
    size = os.path.getsize(file)
    if size != entry["bytes"]:
      raise IntegrityError(f"{file}: {size} bytes, {entry['bytes']} were written")
    if file_sha256(file) != entry["sha256"]:
      raise IntegrityError(f"{file}: its content changed since it was written (sha256 differs)")
  return manifest


def partial_path(target: str) -> str:
  """Where this process builds `target` before renaming it into place:
  `<target>.partial-<host>-<pid>`, its own (concurrent builders do not meet).

  Args:
    target: the directory to build.
  Returns:
    A sibling path.
  """
  return f"{target}.partial-{socket.gethostname()}-{os.getpid()}"


def remove_stale_partials(target: str) -> list[str]:
  """Removes the partial directories of `target` (`partial_path`) left by processes of this
  host that are no longer alive (a build killed midway); returns their paths. Other hosts'
  partials (a shared filesystem) are left alone.

  Args:
    target: the directory being built.
  Returns:
    The removed paths.
  """
  parent, name = os.path.split(os.path.abspath(target))
  prefix = f"{name}.partial-{socket.gethostname()}-"
  removed = []
  for entry in os.listdir(parent) if os.path.isdir(parent) else []:
    pid = entry[len(prefix) :]
    if entry.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
      removed.append(os.path.join(parent, entry))
  return removed


def build_directory(target: str, write: Callable[[str], T]) -> tuple[T, bool]:
  """Builds the directory `target` whole or not at all: `write(partial)` fills this process's
  partial directory (`partial_path`; the stale partials of dead processes are removed first),
  its manifest is written last, and it is renamed into place. Returns (what `write` returned,
  whether this build was kept: False when another process's build of `target` got there first,
  whose directory is kept). Anything raised removes the partial directory and propagates.

  Args:
    target: the directory to build.
    write: fills the partial directory it is given; its result is returned.
  """
  remove_stale_partials(target)
  partial = partial_path(target)
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  try:
    result = write(partial)
    write_manifest(partial)  # Last: a directory with a manifest is complete.
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  try:
    os.replace(partial, target)
  except OSError:
    shutil.rmtree(partial, ignore_errors=True)
    if not os.path.isdir(target):
      raise
    return result, False
  _fsync_directory(os.path.dirname(os.path.abspath(target)))
  return result, True


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Another user's process.
    return True
  return True


@contextlib.contextmanager
def exclusive_lock(path: str) -> Iterator[None]:
  """Holds an exclusive `flock` on `path + ".lock"` (created if needed) for the block: other
  processes wait. Released when the block ends or the process dies.

  Args:
    path: the file the lock guards (the lock is `path + ".lock"`).
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".lock", "a+") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
