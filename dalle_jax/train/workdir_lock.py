"""One writer per run directory: a lock file naming its holder (host, pid, since when).

Process 0 of a launch takes `workdir/LOCK` before anything else is written and removes it at exit.
A second launch on the same workdir is refused with the holder's name. A lock left by a process
that died on this host (SIGKILL, a crash) is taken over with a warning; one left on another host
cannot be checked from here, so the refusal says how to remove it by hand.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import socket

from etils import epath

LOCK_NAME = "LOCK"


class WorkdirLocked(RuntimeError):
  """Another live process writes this run directory."""


def _start_ticks(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (tells a reused pid apart), if known."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(holder: dict) -> bool:
  try:
    os.kill(holder["pid"], 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  started = _start_ticks(holder["pid"])
  return started is None or holder.get("start_ticks") in (None, started)


class WorkdirLock:
  """`acquire()` takes `workdir/LOCK` or raises WorkdirLocked; released by `release()` or at exit."""

  def __init__(self, workdir: str | os.PathLike):
    self.path = epath.Path(workdir) / LOCK_NAME
    pid = os.getpid()
    self.record = {"host": socket.gethostname(), "pid": pid, "start_ticks": _start_ticks(pid),
                   "since": datetime.datetime.now(datetime.timezone.utc).isoformat(
                       timespec="seconds")}
    self.held = False

  def acquire(self) -> None:
    if not self._create():
      holder = self._read()
      if holder is None or holder["host"] != self.record["host"] or _alive(holder):
        raise WorkdirLocked(self._refusal(holder))
      print(f"warning: taking over the lock of process {holder['pid']} on {holder['host']} "
            f"(since {holder['since']}), which is no longer running", flush=True)
      self.path.unlink(missing_ok=True)
      if not self._create():
        raise WorkdirLocked(self._refusal(self._read()))
    self.held = True
    atexit.register(self.release)

  def release(self) -> None:
    if self.held and self._read() == self.record:
      self.path.unlink(missing_ok=True)
    self.held = False

  def _create(self) -> bool:
    """Writes the lock if there is none; False if one exists."""
    text = json.dumps(self.record)
    if _is_local(self.path):
      try:  # O_EXCL: of two launches starting together exactly one creates the file
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:
        f.write(text)
      return True
    if self.path.exists():
      return False
    self.path.write_text(text)
    return self._read() == self.record  # object stores: the last writer wins, so check

  def _read(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except (FileNotFoundError, ValueError):  # gone, or being written this instant
      return None

  def _refusal(self, holder: dict | None) -> str:
    workdir = self.path.parent
    if holder is None:
      return (f"{workdir} is locked ({self.path} exists but names no holder): another launch may "
              "be starting there; if none is, delete that file and start again")
    return (f"{workdir} is in use by process {holder['pid']} on {holder['host']} since "
            f"{holder['since']}: one run writes a workdir at a time. Wait for it to end or stop "
            f"it; if it is no longer running, delete {self.path}; or pass another --workdir")


def _is_local(path: epath.Path) -> bool:
  return "://" not in os.fspath(path)
