"""A run's out-dir: it belongs to one run, is locked while that run uses it, and is tidied at start.

    with OutDir(path, resume=..., overwrite=...) as out:   # creates, locks, removes stale *.tmp
        ...                                                # out.last, out.best, out.metrics, out.data

The lock is an advisory `flock` on `<out_dir>/.lock`, which also names its holder (pid, host, start
time) for the message a second run gets. The kernel releases a flock when its process dies, so a
lock left by a killed run is simply taken over; nothing needs cleaning up by hand.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from minigpt.data import atomic_write
from minigpt.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not protected from each other there
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"
# What a run leaves in its out-dir; any of them means the directory holds a run.
RUN_FILES = ("last.npz", "ckpt.npz", "metrics.jsonl")


class OutDir:
    """Create and lock `path` for one run; refuse a new run where one already is (unless `overwrite`)."""

    def __init__(self, path: str | os.PathLike[str], *, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.resume, self.overwrite = resume, overwrite
        self.last, self.best = self.path / "last.npz", self.path / "ckpt.npz"
        self.metrics, self.data = self.path / "metrics.jsonl", self.path / "data"
        self._lock_fd: int | None = None

    def __enter__(self) -> OutDir:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            what = "is a broken symlink or a symlink loop" if self.path.is_symlink() else "is not a directory"
            raise UserError(f"--out-dir {self.path} {what}; pass another --out-dir") from None
        self._lock()
        try:
            self._check_use()
            self.remove_stale_temporaries()
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._unlock()

    def _check_use(self) -> None:
        used = [name for name in RUN_FILES if (self.path / name).exists()]
        if self.resume:
            if not self.last.exists():
                raise UserError(
                    f"--resume: no checkpoint at {self.last}; train without --resume first (same --out-dir)"
                )
        elif used and not self.overwrite:
            raise UserError(
                f"--out-dir {self.path} already holds a run ({', '.join(used)}); continue it with --resume, "
                "pass a new --out-dir, or --overwrite to replace it"
            )
        elif used:  # --overwrite: the old run's files go now, so nothing of it mixes with the new one
            for name in used:
                (self.path / name).unlink()

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files of writes that were killed (`atomic_write`'s `.<name>.*.tmp`)."""
        removed = []
        for directory in (self.path, self.data):
            if directory.is_dir():
                for tmp in directory.glob(".*.tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()
                        removed.append(tmp)
        return removed

    def trim_metrics(self, step: int) -> None:
        """Drop the metrics records of steps after `step` (logged after the checkpoint a resumed run starts
        from) and a last line cut short by a kill, so the resumed run's records follow on without repeats."""
        if not self.metrics.exists():
            return
        kept = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        with atomic_write(self.metrics) as f:
            f.write("".join(line + "\n" for line in kept).encode("utf-8"))

    # ------------------------------------------------------------------ the lock

    def _lock(self) -> None:
        if fcntl is None:
            return
        path = self.path / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    break  # a file system without flock (some network mounts): run unprotected
                os.close(fd)
                raise UserError(
                    f"--out-dir {self.path} is in use by another run ({describe_holder(path)}); wait for it "
                    "to finish or pass another --out-dir"
                ) from None
            # The holder before us may have removed the file between our open and our flock: then
            # we locked a file nobody else will see, so start again on the new one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(holder) + "\n").encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path / LOCK_FILE)  # while still locked, so no one locks the old file
        os.close(self._lock_fd)
        self._lock_fd = None


def describe_holder(lock_path: Path) -> str:
    """'pid 123 on host h since <time>' from a lock file, or what is known."""
    try:
        holder: dict[str, Any] = json.loads(lock_path.read_text())
        return f"pid {holder['pid']} on host {holder['host']}, since {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"see {lock_path}"


__all__ = ["OutDir", "RUN_FILES"]
