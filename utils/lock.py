"""One run per output folder: a lock file that names its holder and goes stale when the holder is gone.

Two jobs given the same output folder by mistake would write the same seeds,
delete each other's temporary files and mix settings.  A run therefore holds
``<folder>/.swg-run.lock`` from before it writes anything until it ends:

* the file is created with ``O_EXCL`` (atomic on local and network file
  systems) and holds the holder's host, pid, start time and a random token;
* a second run is refused with one line naming the holder
  (:class:`FolderBusy`, exit 2) and nothing of the first run is touched;
* the holder refreshes the file's modification time every
  ``stale_after / 4`` seconds (a background thread), so a holder on another
  host counts as gone when the file is older than ``stale_after`` seconds
  (``SWG_LOCK_STALE_S``, default 120); on the same host a holder whose process
  no longer exists (or whose pid now belongs to a newer process) is gone at once;
* a run that finds a stale lock takes it over (atomically: the stale file is
  renamed away and checked to be the one that was judged stale) and says so.

The lock is released when the run ends, whatever the reason; a run killed
with ``SIGKILL`` leaves it behind, and the next run takes it over as above.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import secrets
import socket
import threading
import time
from typing import Optional

from utils.errors import OutputError, UsageError

__all__ = ["LOCK_NAME", "FolderBusy", "FolderLock", "stale_after"]

LOCK_NAME = ".swg-run.lock"
DEFAULT_STALE_S = 120.0


class FolderBusy(UsageError):
    """The folder is held by another live run."""


def stale_after() -> float:
    """Seconds after which a holder on another host that stopped refreshing the lock counts as gone."""
    try:
        return max(1.0, float(os.environ.get("SWG_LOCK_STALE_S", DEFAULT_STALE_S)))
    except ValueError:
        return DEFAULT_STALE_S


def _proc_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _describe(holder: dict) -> str:
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {holder.get('started', '?')}")


class FolderLock:
    """The lock of one run folder; ``with FolderLock(folder) as lock: ...`` or :meth:`acquire` / :meth:`release`.

    ``what`` names the parameter that chose the folder, for the fix in the refusal.
    ``lock.note`` is a line about a stale lock that was taken over (None otherwise).
    """

    def __init__(self, folder: os.PathLike | str, what: str = "`outdir`", stale_s: Optional[float] = None):
        self.folder = pathlib.Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.stale_s = stale_after() if stale_s is None else float(stale_s)
        self.note: Optional[str] = None
        self.record: Optional[dict] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- reading the current holder ----------------------------------------------------------
    def _read(self) -> Optional[tuple[dict, float]]:
        """``(holder record, age of the file in seconds)``, or None when there is no lock file."""
        try:
            text = self.path.read_text()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise OutputError(self.path, exc, self.what) from exc
        try:
            holder = json.loads(text)
        except ValueError:
            holder = None
        if not isinstance(holder, dict):
            holder = {"token": None, "unreadable": True}  # a lock cut short while being written
        return holder, age

    def _gone(self, holder: dict, age: float) -> Optional[str]:
        """Why ``holder`` no longer holds the folder, or None while it may still be running."""
        if holder.get("unreadable"):
            return "an unreadable lock file" if age > min(self.stale_s, 10.0) else None
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            pid = holder["pid"]
            if not _alive(pid):
                return f"its process {pid} has ended"
            start = _proc_start(pid)
            if holder.get("proc_start") and start and start != holder["proc_start"]:
                return f"its process {pid} has ended (the pid now belongs to another process)"
            return None
        if age > self.stale_s:
            return f"its lock was last refreshed {age:.0f} s ago (more than {self.stale_s:.0f} s)"
        return None

    # -- taking and giving back --------------------------------------------------------------
    def _create(self) -> bool:
        record = {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "token": secrets.token_hex(8)}
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        except OSError as exc:
            raise OutputError(self.path, exc, self.what) from exc
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self.record = record
        return True

    def _take_over(self, holder: dict) -> bool:
        """Move the stale lock of ``holder`` out of the way; False when another run replaced it meanwhile."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # someone else removed it; try to create ours
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = {"token": None}
        if isinstance(moved, dict) and moved.get("token") == holder.get("token"):
            aside.unlink(missing_ok=True)
            return True
        try:  # we moved a fresh lock of a third run: put it back
            os.link(aside, self.path)
        except OSError:
            pass
        aside.unlink(missing_ok=True)
        return False

    def acquire(self) -> "FolderLock":
        """Take the lock or raise :class:`FolderBusy` naming the holder (the folder must exist)."""
        for _ in range(5):
            if self._create():
                self._start_heartbeat()
                return self
            found = self._read()
            if found is None:
                continue
            holder, age = found
            why = self._gone(holder, age)
            if why is None:
                raise FolderBusy(
                    f"{self.folder} is in use by another run ({_describe(holder)}); wait for it to finish or "
                    f"choose another {self.what} (if that run is gone, the lock goes stale after "
                    f"{self.stale_s:.0f} s without refresh, or delete {self.path})")
            if self._take_over(holder):
                self.note = f"took over the lock of an earlier run in {self.folder} ({_describe(holder)}): {why}"
        raise FolderBusy(f"{self.folder}: could not take the run lock {self.path} (other runs keep taking it); "
                         f"choose another {self.what}")

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="folder-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(max(0.5, self.stale_s / 4)):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Give the lock back (only if the file is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.record is None:
            return
        try:
            current = json.loads(self.path.read_text())
        except (OSError, ValueError):
            current = None
        if isinstance(current, dict) and current.get("token") == self.record["token"]:
            self.path.unlink(missing_ok=True)
        self.record = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
