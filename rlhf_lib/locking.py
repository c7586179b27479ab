"""One writer per folder: an OS file lock (the `filelock` package) and a JSON sidecar naming its holder.

    from rlhf_lib.locking import hold_lock
    with hold_lock(runs_root):                 # waits, saying who holds it; wait=False raises LockBusy
        ...write stage artifacts...

run_all.py holds the lock of each size's runs folder and of the output folder for the whole run;
`python -m rlhf_lib.stages` holds its runs folder's. The lock is the kernel's (flock), so it goes away
when its holder dies; the sidecar (`.rlhf.lock.json`) only says who took it, for the message a waiting
run prints. A process that run_all starts (a notebook kernel, a launched stage) finds its parent's pid
in $RLHF_LOCK_HOLDER_PID and works under the lock its parent holds instead of waiting for it forever.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from filelock import FileLock, Timeout

from rlhf_lib.io import atomic_write_text, read_json

LOCK_NAME = ".rlhf.lock"
HOLDER_ENV = "RLHF_LOCK_HOLDER_PID"


class LockBusy(RuntimeError):
    """Another run holds the folder's lock and the caller asked not to wait."""


def lock_file(folder: Path | str) -> Path:
    return Path(folder).resolve() / LOCK_NAME


def holder_file(folder: Path | str) -> Path:
    return lock_file(folder).with_name(LOCK_NAME + ".json")


def read_holder(folder: Path | str) -> dict[str, Any] | None:
    """The sidecar of the folder's lock (pid, host, since, command), or None when absent or unreadable."""
    info = read_json(holder_file(folder), quiet=True)  # a holder mid-write is not worth a warning
    return info if isinstance(info, dict) else None


def describe_holder(info: dict[str, Any] | None) -> str:
    if not info:
        return "an unknown process (no holder record yet)"
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {info.get('since_utc', '?')} "
            f"(`{info.get('command', '?')}`)")


def _held_by_us_or_parent(info: dict[str, Any] | None) -> bool:
    """The holder record names this process, or the run_all that started it ($RLHF_LOCK_HOLDER_PID)."""
    if info is None:
        return False
    owners = {os.getpid()}
    if os.environ.get(HOLDER_ENV, "").isdigit():
        owners.add(int(os.environ[HOLDER_ENV]))
    return info.get("pid") in owners and info.get("host") == socket.gethostname()


@contextmanager
def hold_lock(folder: Path | str, wait: bool = True, poll_s: float = 5.0, out: TextIO | None = None) -> Iterator[Path]:
    """Hold `folder`'s lock for the block (created if needed); yields the lock file's path.

    While another process holds it: wait, printing its holder to `out` (stderr) whenever the holder changes,
    or with wait=False raise LockBusy naming the holder.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    path = lock_file(folder)
    lock = FileLock(path)
    out = out or sys.stderr
    announced: dict[str, Any] | None | bool = False  # the holder last printed; False: not tried yet
    while True:
        try:
            lock.acquire(timeout=0 if announced is False else poll_s)
            break
        except Timeout:
            pass
        holder = read_holder(folder)
        if _held_by_us_or_parent(holder):
            yield path  # under the holder (a kernel or a launched stage of run_all): that process owns the lock
            return
        if not wait:
            raise LockBusy(
                f"{folder} is in use by {describe_holder(holder)}. Wait for that run to finish (or rerun without "
                "--no-wait to wait for it); if it is gone, just rerun: the lock ends with its process."
            )
        if holder != announced:
            print(f"Waiting for {folder}: in use by {describe_holder(holder)}. Ctrl-C stops waiting.", file=out, flush=True)
        announced = holder
    try:
        atomic_write_text(holder_file(folder), json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "since_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "?",
        }) + "\n")
        yield path
    finally:
        holder_file(folder).unlink(missing_ok=True)  # ours: nobody else writes it while we hold the lock
        lock.release()


@contextmanager
def hold_locks(folders: Iterable[Path | str], wait: bool = True, poll_s: float = 5.0) -> Iterator[list[Path]]:
    """Hold several folders' locks (in sorted order, so two runs never wait on each other crosswise), and tell the
    processes started meanwhile that this one holds them ($RLHF_LOCK_HOLDER_PID)."""
    unique = sorted({Path(f).resolve() for f in folders})
    previous = os.environ.get(HOLDER_ENV)
    with ExitStack() as stack:
        held = [stack.enter_context(hold_lock(folder, wait, poll_s)) for folder in unique]
        os.environ[HOLDER_ENV] = str(os.getpid())
        try:
            yield held
        finally:
            if previous is None:
                os.environ.pop(HOLDER_ENV, None)
            else:
                os.environ[HOLDER_ENV] = previous


def parent_death_signal() -> Callable[[], None]:
    """A function that asks Linux to SIGKILL the calling process when its parent dies (prctl PR_SET_PDEATHSIG).

    A launcher killed with SIGKILL (torchrun, or run_all.py above it) cannot pass the signal on, and its workers
    would train on alone, holding memory and writing into a stage nobody will publish. Call the result in each
    worker (rlhf_lib.stages does when launched on several processes), or pass it as `preexec_fn` to a launcher's
    Popen. The C function is looked up here, in the parent, so that the child only makes the system call. A no-op
    off Linux.
    """
    if not sys.platform.startswith("linux"):
        return lambda: None
    import ctypes
    import signal

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1  # from <sys/prctl.h>

    def request() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() == 1:  # the parent died before the request was made: nobody is left to wait for us
            os._exit(1)

    return request
