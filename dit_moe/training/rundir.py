"""The run folder: where it is, the exclusive lock held for the life of a run, and the run's log file.

The lock. ``<run>/run.lock`` is a small JSON file naming its holder::

    {"pid": 4711, "host": "node17", "boot_id": "...", "pid_ns": "pid:[4026531836]", "start_ticks": 123456,
     "started": "2026-12-01T22:00:00", "command": "train.py --resume latest", "token": "3f2a9c0e1b7d"}

It is created atomically (written to a private temporary file, then hard-linked to its name, which fails when
the name exists), so a reader never sees a half-written lock. A second run in the same folder is refused with an
error naming the holder's PID and host. A lock left by a crash does not block: when the holder ran on this
machine (same host name, boot and PID namespace) and that process is gone -- its PID is not running, or is
running with another start time (a reused PID) -- the lock is stale and is broken. A lock from another machine
cannot be checked from here; the error then says which file to delete once that run is known to be dead.
With several processes, only the main process takes the lock (``RunFolder``); the others learn the outcome by a
broadcast, so they neither compete for it nor wait forever when it is refused. The holder checks at every
checkpoint that the lock is still its own, and stops without writing if it is not.
"""
from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import secrets
import shutil
import socket
import sys
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from ..config import ExperimentConfig
from ..errors import RunLockedError, TrainingError
from .stop import on_main

logger = logging.getLogger("dit_moe.train")

LOCK_FILE = "run.lock"


def default_run_name(cfg: ExperimentConfig) -> str:
    """The run folder name when ``train.run_name`` is None: ``<model name>-<routing.type>`` ('/' -> '-')."""
    return f"{cfg.model.name.replace('/', '-')}-{cfg.routing.type}"


def run_dir_of(cfg: ExperimentConfig) -> Path:
    return Path(cfg.train.run_dir) / (cfg.train.run_name or default_run_name(cfg))


# ---------------------------------------------------------------------------------------------------------
#                                                 The lock
# ---------------------------------------------------------------------------------------------------------

def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> tuple[Optional[str], Optional[int]]:
    """(state, start time in clock ticks since boot) of process ``pid`` (Linux); (None, None) where /proc cannot tell."""
    stat = _read(Path(f"/proc/{pid}/stat"))
    if not stat:
        return None, None
    fields = stat.rsplit(")", 1)[1].split()      # after the name, which may hold spaces and parentheses
    return fields[0], int(fields[19])             # fields 3 and 22 of proc(5)


def _this_machine() -> dict:
    pid_ns = ""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pass
    return {"host": socket.gethostname(), "boot_id": _read(Path("/proc/sys/kernel/random/boot_id")), "pid_ns": pid_ns}


def _alive(holder: dict) -> Optional[bool]:
    """Whether the lock's holder still runs: True/False when it ran on this machine, None when that cannot be told."""
    here = _this_machine()
    if any(holder.get(k) != v for k, v in here.items()):
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                                      # runs, under another user
    state, ticks = _proc_stat(pid)
    if state in ("Z", "X"):
        return False                              # exited, not yet reaped by its parent
    return ticks is None or holder.get("start_ticks") is None or ticks == holder["start_ticks"]


def _describe(holder: dict) -> str:
    return (f"PID {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')} "
            f"({holder.get('command')})")


class RunLock:
    """The exclusive lock of one run folder (see the module docstring for the format and the rules)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.token = secrets.token_hex(6)
        self.info = {"pid": os.getpid(), **_this_machine(), "start_ticks": _proc_stat(os.getpid())[1],
                     "started": datetime.datetime.now().isoformat(timespec="seconds"),
                     "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "?",
                     "token": self.token}
        self.held = False
        self.notes: list[str] = []   # what acquire() did, for the run's log (which opens after the lock)

    def holder(self) -> Optional[dict]:
        text = _read(self.path)
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            return None
        return holder if isinstance(holder, dict) else None

    def acquire(self) -> "RunLock":
        tmp = self.path.with_name(f".{LOCK_FILE}.tmp-{self.token}")
        try:
            tmp.write_text(json.dumps(self.info) + "\n")
            for _ in range(3):
                if self._create(tmp):
                    self.held = True
                    return self
                holder = self.holder()
                alive = _alive(holder) if holder is not None else None
                if alive is False:
                    self._break_stale(holder)
                    continue
                if holder is None:
                    raise RunLockedError(f"run folder {self.path.parent} is locked ({self.path} is unreadable); "
                                         f"if no training uses this folder, delete {self.path}")
                where = ("" if alive else f"; it ran on another machine (or container), so if that run is dead, "
                                          f"delete {self.path}")
                raise RunLockedError(f"run folder {self.path.parent} is in use by {_describe(holder)}{where}")
            raise RunLockedError(f"run folder {self.path.parent}: could not take the lock {self.path} "
                                 "(other processes keep taking it)")
        finally:
            tmp.unlink(missing_ok=True)

    def _create(self, tmp: Path) -> bool:
        """Create the lock atomically from ``tmp``; False when it exists."""
        try:
            os.link(tmp, self.path)                # atomic, fails when the name exists; readers see all or nothing
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        try:                                       # a filesystem without hard links: exclusive create, then write
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.info) + "\n")
        return True

    def _break_stale(self, holder: dict) -> None:
        # Move the lock aside under a name only we use, then make sure it is the stale one we judged: if another
        # process broke it and took a fresh lock in between, put that one back.
        grave = self.path.with_name(f".{LOCK_FILE}.stale-{self.token}")
        try:
            os.replace(self.path, grave)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(_read(grave) or "null")
        except json.JSONDecodeError:
            moved = None
        if isinstance(moved, dict) and moved.get("token") != holder.get("token"):
            try:
                os.link(grave, self.path)
            except FileExistsError:
                pass
        else:
            self.notes.append(f"removed the stale lock of {_describe(holder)}: that process is gone")
        grave.unlink(missing_ok=True)

    def verify(self) -> None:
        """Raise if the lock is no longer ours (deleted by hand, or taken by another process)."""
        holder = self.holder()
        if holder is None or holder.get("token") != self.token:
            now = _describe(holder) if holder else "nobody"
            raise TrainingError(f"lost the lock of run folder {self.path.parent} (it now names {now}); stopped "
                                "without writing, so the other process's checkpoints are not overwritten")

    def release(self) -> None:
        if self.held:
            holder = self.holder()
            if holder is not None and holder.get("token") == self.token:
                self.path.unlink(missing_ok=True)
            self.held = False


# ---------------------------------------------------------------------------------------------------------
#                                       The run folder for one train() call
# ---------------------------------------------------------------------------------------------------------

class _TqdmHandler(logging.Handler):
    """Log lines that do not break the progress bar."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record))
        except Exception:
            self.handleError(record)


class RunFolder:
    """Context manager: creates the run folder, takes its lock (main process) and logs to ``log.txt``.

    ``token`` (the lock holder's, the same on every rank) names this run's temporary files.
    """

    def __init__(self, run_dir: Path, accelerator):
        self.dir = Path(run_dir)
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.lock: Optional[RunLock] = None
        self.token = ""
        self.created = False                 # by this call: removed again if the start fails (until ``keep``)
        self._handlers: list[logging.Handler] = []

    def _take(self) -> str:
        try:
            self.created = not self.dir.exists()
            self.dir.mkdir(parents=True, exist_ok=True)
            self.lock = RunLock(self.dir).acquire()
            (self.dir / "checkpoints").mkdir(exist_ok=True)
        except OSError as e:
            if self.created:                  # e.g. a full disk: leave no empty run folder behind
                shutil.rmtree(self.dir, ignore_errors=True)
            raise TrainingError(f"cannot create the run folder {self.dir} or its lock: {e}") from e
        return self.lock.token

    def __enter__(self) -> "RunFolder":
        self.token = on_main(self.accelerator, self._take)
        try:
            self._setup_logging()
            for note in self.lock.notes if self.lock is not None else []:
                logger.warning(note)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _setup_logging(self) -> None:
        logger.setLevel(logging.INFO if self.is_main else logging.WARNING)
        logger.propagate = False
        fmt = logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S")
        self._handlers = [_TqdmHandler()]
        if self.is_main:
            self._handlers.append(logging.FileHandler(self.dir / "log.txt"))
        for h in self._handlers:
            h.setFormatter(fmt)
            logger.addHandler(h)

    def keep(self) -> None:
        """Training begins: from here on the folder stays, whatever happens."""
        self.created = False

    def verify(self) -> None:
        if self.lock is not None:
            self.lock.verify()

    def __exit__(self, exc_type=None, *exc) -> None:
        for h in self._handlers:
            logger.removeHandler(h)
            h.close()
        self._handlers = []
        if self.lock is not None:
            if exc_type is not None and self.created and self._holds_nothing():
                shutil.rmtree(self.dir, ignore_errors=True)   # a failed start leaves no empty run folder
            self.lock.release()
            self.lock = None

    def _holds_nothing(self) -> bool:
        """Only what a start writes before training: the lock, the log, config.yaml, an empty checkpoints/."""
        ckpts = self.dir / "checkpoints"
        return (all(p.name in (LOCK_FILE, "log.txt", "config.yaml", "checkpoints") for p in self.dir.iterdir())
                and not (ckpts.is_dir() and any(ckpts.iterdir())))
