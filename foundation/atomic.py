"""Atomic writes: everything goes to a temporary sibling that is renamed into place only when complete.

A failed body, Ctrl-C (SIGINT) or SIGTERM removes the temporary sibling; a run killed outright (SIGKILL, power
loss) leaves one behind, named with its process id, which the next write beside the same target removes once
that process is gone. A reader therefore sees either the old target or the complete new one, never a part.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import uuid
from pathlib import Path

_LIVE: set[Path] = set()  # this process's temporary folders and files, removed on SIGINT/SIGTERM
_PREVIOUS: dict[int, object] = {}  # the handlers ours run before


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _on_signal(signum, frame):
    previous = _PREVIOUS[signum]
    if previous == signal.SIG_IGN:
        return
    for path in list(_LIVE):
        _remove(path)
    _LIVE.clear()
    if callable(previous):  # e.g. Python's SIGINT handler, which raises KeyboardInterrupt
        previous(signum, frame)
        return
    signal.signal(signum, signal.SIG_DFL)  # die of the signal, as without us
    os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    """Chain a clean-up in front of the SIGINT and SIGTERM handlers (signals reach the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signum not in _PREVIOUS:
            _PREVIOUS[signum] = signal.getsignal(signum)
            signal.signal(signum, _on_signal)


def _temp_sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of `target` left by processes that no longer run; return them. A run killed
    between moving the old target aside and renaming the new one in leaves only the old: it is put back."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    removed = []
    for path in target.parent.iterdir():
        rest = path.name[len(target.name) + 2:] if path.name.startswith(f".{target.name}.") else ""
        kind, _, tail = rest.partition("-")
        pid = tail.split("-", 1)[0]
        if kind in ("tmp", "old") and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            if kind == "old" and not target.exists():
                os.replace(path, target)
                continue
            _remove(path)
            removed.append(path)
    return removed


@contextlib.contextmanager
def _tracked(path: Path):
    _install_handlers()
    _LIVE.add(path)
    try:
        yield path
    except BaseException:
        _remove(path)
        raise
    finally:
        _LIVE.discard(path)


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike, overwrite: bool = False, exist_ok: bool = False):
    """Yield a temporary sibling folder that becomes `out` when the body succeeds.

    An existing non-empty `out` is an error unless `overwrite` (replace it) or `exist_ok` (keep it, drop ours:
    for caches, where whoever finishes first wins)."""
    out = Path(out)
    if out.exists() and not (overwrite or exist_ok) and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output {out} already exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = _temp_sibling(out, "tmp")
    with _tracked(tmp):
        tmp.mkdir()
        yield tmp
        if out.exists() and overwrite:
            old = _temp_sibling(out, "old")
            os.replace(out, old)
            os.replace(tmp, out)
            _remove(old)
            return
        try:
            os.replace(tmp, out)  # onto nothing or an empty folder
        except OSError:
            if not (exist_ok and out.is_dir()):
                raise
            _remove(tmp)  # another process finished first


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a temporary sibling path to write; it replaces `path` when the body succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path, "tmp")
    with _tracked(tmp):
        yield tmp
        os.replace(tmp, path)


def write_json(path: str | os.PathLike, data, **dumps_args) -> None:
    """`data` as JSON at `path`, written atomically (`dumps_args` go to json.dumps, indent 1 unless given)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, **{"indent": 1, **dumps_args}) + "\n")
