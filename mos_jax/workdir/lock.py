"""One run per workdir: an exclusive `fcntl` lock on `DIR/.lock`, released by the OS when the
process dies, so a crashed or killed run never leaves the workdir blocked.

The lock file holds who has it (pid, host, start time, command) for the refusal message. A clean
release removes the file again (and the workdir, if the lock created it and nothing else was
written), so a refused or failed start leaves the folder as it was.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time

from mos_jax.infra import errors

log = logging.getLogger(__name__)
LOCK_FILE = '.lock'


class WorkdirInUse(errors.UserError):
  """Another live process holds the workdir's lock."""


class WorkdirLock:
  """`with WorkdirLock(workdir):` or `acquire()` / `release()`."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._file = None
    self._created_dir = False

  def acquire(self) -> 'WorkdirLock':
    self._created_dir = not os.path.isdir(self.workdir)
    os.makedirs(self.workdir, exist_ok=True)
    while True:
      f = open(self.path, 'a+', encoding='utf-8')
      try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        self._remove_dir_if_ours()
        raise WorkdirInUse(f'{self.workdir} is in use by another run ({_describe(holder)}); a '
                           f'workdir takes one run at a time. Wait for it to finish, stop it, or '
                           f'use another --workdir.') from None
      except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
          raise
        # Some network filesystems (gcsfuse) have no locks: go on unprotected, and say so.
        log.warning('%s: this filesystem does not support file locks; nothing stops a second '
                    'run from using the same workdir.', self.workdir)
        f.close()
        return self
      # The holder before us may have removed the file between our open and our lock:
      # then we locked a file nobody else will see, and must lock the new one.
      try:
        same = os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      f.close()
    f.seek(0)
    f.truncate()
    f.write(json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                        'started': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
                        'command': ' '.join(sys.argv)}) + '\n')
    f.flush()
    self._file = f
    return self

  def release(self) -> None:
    if self._file is None:
      return
    try:
      os.remove(self.path)  # Before unlocking, so a waiting process re-checks the inode.
    except FileNotFoundError:
      pass
    fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
    self._file.close()
    self._file = None
    self._remove_dir_if_ours()

  def _remove_dir_if_ours(self):
    if self._created_dir:
      try:
        os.rmdir(self.workdir)  # Only if empty: nothing but the lock was ever written.
      except OSError:
        pass

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _describe(holder: str) -> str:
  try:
    info = json.loads(holder)
    return (f'pid {info["pid"]} on {info["host"]}, started {info["started"]}: '
            f'{info["command"]}')
  except (ValueError, KeyError, TypeError):
    return 'a process that left no details'
