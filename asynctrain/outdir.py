"""Output folders: one run at a time, no silent overwrite, and writes that fail with
the file named.

    with outdir.claim(out, fresh=args.fresh) as folder:   # or OutputError naming the owner
        ...
        outdir.write_text(folder / "table.md", text)          # atomic

A run owns its output folder through a lock file, ``<out>/.asynctrain.lock``,
holding the process id, host, start time and command. A second run that finds it
held by a live process stops before any work, naming that run; a lock left by a
process that is gone (killed) is taken over, with a note. The lock is released when
the run ends, however it ends; folders the claim made are removed again if the run
left them empty.

Writes (`write_text`, `saving`) go through a temporary file and ``os.replace``, so a
crash leaves the previous file; a failure (a full disk, a read-only folder, a folder
where a file should be) raises `OutputError` naming the file, instead of torch's
``[enforce fail at inline_container.cc]`` or a bare ``OSError``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

__all__ = ["OutputError", "LOCK_NAME", "claim", "clear", "write_text", "saving", "check_owner",
           "write_record"]

LOCK_NAME = ".asynctrain.lock"
_HELD: set[Path] = set()  # folders this process holds (a claim inside a claim is a no-op)


class OutputError(OSError):
    """An output file or folder that cannot be written or is owned by another run;
    the message names it and what to do."""


def _reason(err: BaseException, path: Path) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "enforce fail" in text or "file write failed" in text or "unexpected pos" in text:
        text = f"the write stopped part way ({text[:120]})"
    try:
        free = shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free
    except (OSError, StopIteration):
        free = None
    if free is not None and free < 64 * 2**20:
        text += f"; {free / 2**20:.1f} MiB free on that disk (full?)"
    return text


@contextlib.contextmanager
def saving(path: str | os.PathLike, what: str = "file") -> Iterator[Path]:
    """Write `path` atomically: yields a temporary path in the same folder to write
    to, then renames it onto `path`. Any failure raises `OutputError` naming `path`
    and leaves the previous file as it was."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {what} {path}: it is a folder, not a file")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        if isinstance(err, OutputError):
            raise
        kept = " (the previous one is intact)" if path.exists() else ""
        raise OutputError(f"could not write {what} {path}: {_reason(err, path)}{kept}") from err
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str, what: str = "file") -> Path:
    """Write `text` to `path` atomically (`saving`)."""
    with saving(path, what) as tmp:
        tmp.write_text(text)
    return Path(path)


# ----------------------------------------------------------------------- the lock
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _describe(owner: dict[str, Any]) -> str:
    cmd = owner.get("command") or "?"
    return (f"pid {owner.get('pid')} on {owner.get('host')} since {owner.get('started')}: "
            f"`{cmd if len(cmd) <= 160 else cmd[:157] + '...'}`")


@contextlib.contextmanager
def claim(folder: str | os.PathLike, what: str = "--out") -> Iterator[Path]:
    """Own `folder` for the duration of the block (module docstring); `OutputError`
    naming the other run when a live one holds it."""
    folder = Path(folder)
    if folder.resolve() in _HELD:  # e.g. the audit run by recipes/byom_snntorch.py in its --out
        yield folder
        return
    made = [d for d in (folder, *folder.parents) if not d.exists()]  # removed again if left empty
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{what} {folder}: cannot create the folder: {_reason(err, folder)}") from err
    lock = folder / LOCK_NAME
    me = dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%d %H:%M:%S"),
              command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                owner = {}
            pid = owner.get("pid")
            if isinstance(pid, int) and owner.get("host") == me["host"] and not _alive(pid):
                print(f"note: {what} {folder} was locked by a run that is gone ({_describe(owner)}); "
                      f"taking it over", file=sys.stderr)
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                continue
            raise OutputError(
                f"{what} {folder} is in use by another run ({_describe(owner)}); two runs in one "
                f"folder overwrite each other's models and tables. Wait for it to finish, choose "
                f"another {what}, or delete {lock} if that run is gone") from None
        except OSError as err:
            raise OutputError(f"{what} {folder}: cannot write in it: {_reason(err, folder)}") from err
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    _HELD.add(folder.resolve())
    try:
        yield folder
    finally:
        _HELD.discard(folder.resolve())
        with contextlib.suppress(OSError, ValueError):
            if json.loads(lock.read_text()).get("pid") == me["pid"]:
                lock.unlink()
        for d in made:  # a run that stopped before writing anything leaves no folder
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty


# --------------------------------------------------------------------- ownership
def check_owner(folder: str | os.PathLike, record: str, identity: dict[str, Any], *,
                fresh: bool, outputs: tuple[str, ...], what: str = "--out") -> None:
    """Before any work: a folder holding the results of another run (its `record`
    file, JSON, names other settings than `identity`) is refused unless `fresh`; with
    `fresh` its `outputs` and the record are deleted. The run calls `write_record`
    when it writes its first output."""
    folder = Path(folder)
    path = folder / record
    plain = json.loads(json.dumps(identity, default=str))
    if path.is_file() and not fresh:
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = None
        if stored != plain:
            diff = ("unreadable record" if not isinstance(stored, dict) else "; ".join(
                f"{k}: {stored.get(k)!r} there, {v!r} here" for k, v in plain.items()
                if stored.get(k) != v))
            raise OutputError(f"{what} {folder} holds the results of another run ({diff}); "
                              f"--fresh replaces them, or choose another {what}")
    if fresh:
        for name in (*outputs, record):
            p = folder / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


def write_record(folder: str | os.PathLike, record: str, identity: dict[str, Any]) -> None:
    """Say which run's results `folder` holds (read by `check_owner`)."""
    write_text(Path(folder) / record, json.dumps(identity, indent=1, default=str) + "\n", "run record")


def clear(folder: str | os.PathLike) -> None:
    """Delete everything in `folder` but its lock (``--fresh`` of a run that owns it)."""
    for p in Path(folder).iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
