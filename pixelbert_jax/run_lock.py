"""One run per workdir: `WORKDIR/run.lock` names the run that holds it (host, pid, start time, command).

Two runs on one workdir overwrite each other's checkpoints and duplicate metrics.jsonl, so the second is
refused with one line naming the holder. The file carries an flock, which the kernel drops when its process
dies however it dies (kill -9 included): a lock left by a dead process on this host is taken over with a
warning. A lock from another host is never taken over (its process cannot be checked from here); the
message says to delete the file if that run is gone. Object-store workdirs (gs://) cannot be locked.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time

LOCK_NAME = "run.lock"


class WorkdirBusyError(RuntimeError):
  """Another run holds the workdir; the message names it."""


class RunLock:

  def __init__(self, workdir: str):
    self.path = os.path.join(str(workdir), LOCK_NAME)
    self._fd: int | None = None

  def acquire(self) -> "RunLock":
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join(sys.argv),
    }
    for _ in range(10):  # retried only when the file was replaced between open and flock
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _read(fd)
        os.close(fd)
        raise WorkdirBusyError(
            f"workdir {os.path.dirname(self.path)} is in use by {_describe(holder)} "
            f"(lock file {self.path}); wait for that run to end"
        ) from None
      if not _same_file(fd, self.path):  # the holder released and deleted it meanwhile: lock the new one
        os.close(fd)
        continue
      holder = _read(fd)
      if holder and holder.get("host") != me["host"]:
        os.close(fd)  # its process cannot be checked from this host
        raise WorkdirBusyError(
            f"workdir {os.path.dirname(self.path)} is locked by {_describe(holder)} "
            f"(lock file {self.path}); delete the lock file if that run is gone"
        )
      if holder:
        logging.warning("Taking over the lock %s of %s: that process is gone.", self.path, _describe(holder))
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
      self._fd = fd
      return self
    raise WorkdirBusyError(f"could not lock {self.path}: it kept changing; is another run starting?")

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      if _same_file(self._fd, self.path):
        os.unlink(self.path)  # before the flock goes, so no newcomer locks a file about to vanish
    finally:
      os.close(self._fd)
      self._fd = None


class NoLock:
  """What the other processes of a multi-host run, and object-store workdirs, hold."""

  def release(self) -> None:
    pass


def acquire(workdir: str) -> RunLock | NoLock:
  if "://" in str(workdir):
    logging.info("Workdir %s is on an object store: not locked; run one job per workdir.", workdir)
    return NoLock()
  return RunLock(workdir).acquire()


def _read(fd: int) -> dict:
  try:
    data = os.pread(fd, 65536, 0).decode()
    return json.loads(data) if data.strip() else {}
  except (OSError, ValueError):
    return {"host": "?", "pid": "?", "started": "?", "unreadable": True}


def _describe(holder: dict) -> str:
  if not holder:
    return "another process (it has not written its name yet)"
  return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} (started {holder.get('started', '?')})"


def _same_file(fd: int, path: str) -> bool:
  try:
    a, b = os.fstat(fd), os.stat(path)
  except FileNotFoundError:
    return False
  return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
