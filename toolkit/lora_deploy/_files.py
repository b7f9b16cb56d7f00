"""Small file helpers shared by the readers and writers: JSON objects and staged output folders.

:func:`staged_folder` is the one way this package writes a folder: into a hidden temporary folder
beside the destination, renamed into place only when complete. A crash (even ``kill -9``) can leave
such a partial folder behind; the next write into the same destination finds partials whose owner
process is gone, removes them and reports them, so a killed 70B merge does not leave 100 GB of litter.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from lora_deploy.errors import InputError, OutputError

_OWNER_FILE = ".lora-deploy-owner"


def read_json_object(path: Path, *, missing: str, hint: str) -> dict:
    """A JSON object from ``path``; a clear InputError when it is missing, not JSON, or not an object."""
    if not path.is_file():
        raise InputError(f"{path} is missing: {missing}", hint=hint)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e})") from e
    except OSError as e:
        raise InputError(f"{path} cannot be read: {e.strerror or e}", hint="check its permissions") from e
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object")
    return data


def contained_file(path: Path, folder: Path) -> Path:
    """``path``, a file listed in ``folder``, if reading it stays inside ``folder``; an InputError otherwise.

    A symbolic link is followed only to a regular file inside the folder, or, for a Hugging Face cache snapshot
    (``.../snapshots/<commit>``), inside that repository's cache folder (where the hub client keeps the blobs the
    snapshot links to). Anything else (``notes.txt -> /proc/self/environ``, a link to another user's file) is
    refused, naming the file: its bytes would be copied into a checkpoint or a shared adapter store.
    """
    folder = Path(folder)
    if not path.is_symlink():
        if not path.is_file():
            raise InputError(f"{path} is not a regular file", hint="remove it from the folder")
        return path
    root = folder.resolve()
    allowed = root.parent.parent if root.parent.name == "snapshots" else root
    target = path.resolve()
    if not target.is_file() or not target.is_relative_to(allowed) or target.is_relative_to(Path("/proc")):
        raise InputError(f"{path} is a symbolic link to {target}, outside {folder}: its contents are not copied",
                         hint="replace the link with the file itself (cp --dereference) if you trust it, or "
                         "remove it")
    return path


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass(frozen=True)
class StalePartial:
    """A partial output folder left by a process that no longer runs, removed before this write."""

    path: str
    bytes: int
    owner_pid: int | None


@dataclass
class StagedFolder:
    """The temporary folder being filled, and what was cleaned up before it was made."""

    path: Path
    output: Path
    stale_removed: list[StalePartial] = field(default_factory=list)


def check_output_free(output: Path, force: bool) -> None:
    """Refuse an existing output (unless ``force``) or an output whose parent cannot be written."""
    output = Path(output)
    if output.exists():
        if not force:
            raise OutputError(f"output folder {output} already exists", hint="pass --force to replace it")
        if not output.is_dir():
            raise OutputError(f"output {output} exists and is not a folder")
    parent = output.resolve().parent
    while not parent.exists():  # missing parents are created when writing starts, like mkdir -p
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise OutputError(f"cannot create the output folder {output}: {parent} is not writable")


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux /proc), to tell a live owner from a reused PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _process_start(pid) in (None, start)


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def remove_stale_partials(output: Path) -> list[StalePartial]:
    """Remove ``.NAME.partial-*`` folders beside ``output`` whose owner process is gone; return what went."""
    output = Path(output).resolve()
    if not output.parent.is_dir():
        return []
    removed = []
    for cand in output.parent.glob(f".{output.name}.partial-*"):
        if not cand.is_dir():
            continue
        pid, start = None, None
        try:
            owner = json.loads((cand / _OWNER_FILE).read_text())
            pid, start = int(owner["pid"]), owner.get("start")
        except (OSError, ValueError, KeyError, TypeError):
            tail = cand.name.rsplit("-", 1)[-1]
            pid = int(tail) if tail.isdigit() else None
        if pid is not None and pid != os.getpid() and _alive(pid, start):
            continue  # another merge into the same output is running right now
        size = _folder_bytes(cand)
        shutil.rmtree(cand, ignore_errors=True)
        removed.append(StalePartial(str(cand), size, pid))
    return removed


def check_free_space(folder: Path, required: int, *, what: str) -> None:
    """Refuse to start writing ``required`` bytes into ``folder``'s file system when they do not fit."""
    probe = Path(folder).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if required > free:
        raise OutputError(f"not enough free space for {what}: it needs {human_bytes(required)} "
                          f"({required} bytes) but {probe} has {human_bytes(free)} ({free} bytes) free",
                          hint="free some space, or write the output to another disk")


@contextmanager
def staged_folder(output: Path, *, force: bool, required_bytes: int = 0, what: str = "the output"
                  ) -> Iterator[StagedFolder]:
    """Yield a temporary folder beside ``output``; on success rename it into place, on any failure remove it.

    Before anything is written: stale partial folders of earlier, killed writes into the same output are
    removed (and listed in ``stale_removed``), and ``required_bytes`` is checked against the free space.
    An existing output is replaced only after the new one is complete, and only with ``force``.
    A full disk during the write becomes an :class:`OutputError` (exit 5) and leaves nothing behind.
    """
    output = Path(output).resolve()
    check_output_free(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_partials(output)
    if required_bytes:
        check_free_space(output.parent, required_bytes, what=what)
    tmp = output.parent / f".{output.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    staged = StagedFolder(tmp, output, stale)
    try:
        (tmp / _OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "start": _process_start(os.getpid())}))
        yield staged
        (tmp / _OWNER_FILE).unlink()
        fsync_dir(tmp)
        _commit(tmp, output, force)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(output.parent).free
            raise OutputError(f"the disk filled up while writing {what} into {output.parent} "
                              f"({human_bytes(free)} free now); nothing was left behind",
                              hint="free some space, or write the output to another disk") from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit(tmp: Path, output: Path, force: bool) -> None:
    """Move the finished folder into place; an existing output (allowed by force) is replaced only now."""
    old = None
    if output.exists():
        if not force:  # appeared while we were writing
            raise OutputError(f"output folder {output} appeared while writing", hint="pass --force to replace it")
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        output.rename(old)
    try:
        tmp.rename(output)
    except OSError:
        if old is not None:
            old.rename(output)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a rename into it, new files) durable; best effort where the file system refuses."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
