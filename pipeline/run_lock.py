"""One process at a time per run folder: `explain`, `report`, `heatmaps` and `spray` hold RUN/run.lock
(RunLayout.lock) for their whole run, so that two drivers never write one OUT and no reader reads a run being written.

The lock is a file created atomically with link() (safe on NFS, where flock alone is not) holding its holder's
host, pid, process start time (/proc), boot id, start date and command; the holder also keeps an flock on it, which
serialises the recovery of stale locks on one host. A lock of a dead process is recovered: on the same host when
the pid is gone, was reused (another start time), is a zombie or the machine rebooted (another boot id). A lock held
on another host is never broken (this host cannot see that process): the refusal names it and says how to remove
it. Hosts are told apart by hostname, so machines or containers sharing a run folder need distinct hostnames.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

from lrp_module.files import temporary_path

from .errors import RunError
from .layout import RunLayout

try:
    import fcntl
except ImportError:  # not on Windows: the link()-created file alone is the lock
    fcntl = None

ATTEMPTS = 50  # a lock that changes under us (released, recovered by another process) is looked at again
RETRY_S = 0.05
COMMAND_CHARS = 160  # of the holder's command line, in the refusal
UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class RunLockError(RunError):
    """The run folder is in use by another process (or its lock cannot be taken); the message names the holder."""


@dataclass(frozen=True)
class Holder:
    """Who holds a run folder's lock: what the lock file records."""

    host: str
    pid: int
    start: str | None  # the process's start time in clock ticks since boot (/proc/PID/stat field 22)
    boot: str | None  # /proc/sys/kernel/random/boot_id: a pid of an earlier boot is not this boot's process
    since: str  # UTC date the lock was taken
    purpose: str  # explain, report, heatmaps, spray
    command: str
    token: str  # tells this lock file from a later one of the same process

    @classmethod
    def this_process(cls, purpose: str) -> Holder:
        return cls(host=socket.gethostname(), pid=os.getpid(), start=process_start(os.getpid()), boot=boot_id(),
                   since=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), purpose=purpose,
                   command=_command_line(), token=secrets.token_hex(8))

    @classmethod
    def parse(cls, text: str) -> Holder:
        data = json.loads(text)
        return cls(host=str(data["host"]), pid=int(data["pid"]), start=data.get("start"), boot=data.get("boot"),
                   since=str(data.get("since", "?")), purpose=str(data.get("purpose", "?")),
                   command=str(data.get("command", "?")), token=str(data.get("token", "")))

    def describe(self) -> str:
        command = self.command if len(self.command) <= COMMAND_CHARS else self.command[:COMMAND_CHARS] + "..."
        return f"{self.purpose} by pid {self.pid} on host {self.host}, since {self.since}: {command}"

    def is_running(self) -> bool:
        """On this host: is the recorded process still the one that took the lock?"""
        current_boot = boot_id()
        if self.boot and current_boot and self.boot != current_boot:
            return False  # the machine rebooted since
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's process: it exists
        stat = _proc_stat(self.pid)
        if stat is None:
            return True  # no /proc: the pid exists, which is all this host can tell
        state, start = stat
        return state != "Z" and (self.start is None or start == self.start)


def _command_line() -> str:
    """This process's command on one line (`python -m pipeline ...` as typed, not its __main__.py path)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).parts[-2:] == ("pipeline", "__main__.py"):
        return " ".join(["python -m pipeline", *(shlex.join(argv[1:]).split())])
    return " ".join(shlex.join(argv).split())


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in ticks) of a process from /proc, None where /proc cannot tell."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name in (...) may hold spaces
    return fields[0], fields[19]  # fields 3 and 22 of proc(5)


def process_start(pid: int) -> str | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


class RunLock:
    """The lock of one run folder, held from acquire() to release(); use hold_run()."""

    def __init__(self, root: str | Path, purpose: str, create: bool) -> None:
        self.layout = RunLayout(root)
        self.path = self.layout.lock
        self.purpose = purpose
        self.create = create  # explain: make OUT (and parents) for the lock; removed again if left empty
        self.holder: Holder | None = None
        self._fd: int | None = None
        self._created: list[Path] = []
        self._unwritable = False  # a reader's folder that cannot take a lock file

    # ------------------------------------------------------------------------------------------ acquire
    def acquire(self) -> bool:
        """Take the lock, recovering a dead process's; False when the folder cannot be written (a reader then
        reads unlocked: no writer of ours can be at work in it). RunLockError when another process holds it."""
        stale = None
        for _ in range(ATTEMPTS):
            holder = self._read()
            if holder is None:
                if self._try_create():
                    return True
                if self._unwritable:
                    return False
                continue
            self._refuse_unless_stale(holder)
            outcome = self._remove_stale(holder)
            if outcome == "removed":
                print(f"note: removed the stale lock {self.path} of {holder.describe()} (no longer running)",
                      file=sys.stderr, flush=True)
            elif outcome == "busy":
                stale = holder
                time.sleep(RETRY_S)
        if stale is not None:
            raise RunLockError(f"{self.path}: its holder ({stale.describe()}) is gone, but another process keeps "
                               f"the lock file locked (a child of it?); stop that process, or remove {self.path}")
        raise RunLockError(f"{self.path}: the lock kept changing ({ATTEMPTS} attempts); try again")

    def _read(self) -> Holder | None:
        """The current holder, None when there is no lock file."""
        try:
            text = self.path.read_text()
        except (FileNotFoundError, NotADirectoryError):  # no lock there (OUT missing, or under a file: said next)
            return None
        except OSError as error:
            raise RunLockError(f"{self.path}: cannot read the run's lock ({error.strerror or error})") from None
        try:
            return Holder.parse(text)
        except (ValueError, KeyError, TypeError):
            raise RunLockError(f"{self.path}: unreadable lock file; if no other process is using "
                               f"{self.layout.root}, remove it") from None

    def _refuse_unless_stale(self, holder: Holder) -> None:
        if holder.host != socket.gethostname():
            raise RunLockError(f"{self.layout.root} is in use: {holder.describe()}; it runs on another host, so "
                               f"this one cannot tell whether it still does: if it does not, remove {self.path}")
        if holder.is_running():
            raise RunLockError(f"{self.layout.root} is in use: {holder.describe()}; wait for it to finish or "
                               "use another run directory")

    def _try_create(self) -> bool:
        """Write this process's record under a temporary name and link it to the lock's name: atomic, and it
        fails when the name exists, on NFS too. True when the lock is ours."""
        self._unwritable = False
        holder = Holder.this_process(self.purpose)
        tmp = temporary_path(self.path.with_name(f"{self.path.name}-{holder.token}"))
        try:
            self._make_folder()
            with open(tmp, "x", encoding="utf-8") as handle:
                handle.write(json.dumps(asdict(holder), indent=2))
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            except OSError:
                if os.stat(tmp).st_nlink != 2:  # NFS: the link may be made yet reported failed
                    raise
        except OSError as error:
            if self.create or error.errno not in UNWRITABLE:
                self._remove_created()
                raise RunLockError(f"run directory {self.layout.root.absolute()} is not writable: "
                                   f"{error.strerror or error}") from None
            self._unwritable = True
            return False
        finally:
            with suppress(OSError):  # never made (an unwritable folder) or already gone
                tmp.unlink()
        self.holder = holder
        self._fd = _open(self.path)
        _flock(self._fd)  # ours: the file was created just now, and only a recovering process takes its flock
        return True

    def _make_folder(self) -> None:
        """Make OUT and its missing parents, remembering those this process made (not a racing one)."""
        if not self.create:
            return
        folder = self.layout.root.absolute()
        missing = []
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            self._created.insert(0, folder)

    def _remove_stale(self, holder: Holder) -> str:
        """Remove the lock file of a dead holder, under its flock (so that two recovering processes never
        remove each other's fresh lock) and only if it is still the file that was judged: "removed", "changed"
        (another file is there now, or none) or "busy" (another process holds its flock)."""
        try:
            fd = _open(self.path)
        except FileNotFoundError:
            return "changed"
        try:
            if not _flock(fd):
                return "busy"  # another process is recovering it (or a child of the dead holder kept it)
            if not _same_file(fd, self.path):
                return "changed"
            try:
                current = Holder.parse(os.read(fd, 1 << 16).decode("utf-8", "replace"))
            except (ValueError, KeyError, TypeError):
                return "changed"
            if current.token != holder.token:
                return "changed"
            self.path.unlink()
            return "removed"
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------------------------ release
    def release(self) -> None:
        """Remove the lock file (only if it is still ours), drop the flock, and remove the folders the lock made
        if nothing else was written into them."""
        if self._fd is not None:
            try:
                if _same_file(self._fd, self.path):
                    self.path.unlink()
            finally:
                os.close(self._fd)
                self._fd = None
                self.holder = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: the run wrote into it
        self._created = []


def _open(path: Path) -> int:
    """Open for writing where allowed: NFS emulates flock with POSIX locks, whose exclusive kind needs it."""
    try:
        return os.open(path, os.O_RDWR)
    except PermissionError:
        return os.open(path, os.O_RDONLY)


def _flock(fd: int) -> bool:
    """An exclusive flock without waiting: False when another process holds one; True where flock is missing
    or refused by the filesystem (the link()-created file is then the only lock)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


@contextmanager
def hold_run(root: str | Path, purpose: str, create: bool = True) -> Iterator[RunLock]:
    """Hold `root`'s lock for the block and release it on every way out (return, exception, Ctrl-C). create:
    make the folder for the lock (explain); otherwise (readers) only a folder that is a run is locked, and one
    that cannot be written is read unlocked. RunLockError when another process holds it."""
    lock = RunLock(root, purpose, create)
    layout = lock.layout
    wanted = create or (layout.root.is_dir() and (layout.is_run() or layout.lock.exists()
                                                  or (layout.root / RunLayout.STATS).is_dir()))
    try:
        if wanted:
            lock.acquire()
        yield lock
    finally:
        lock.release()
