"""Small file helpers shared by the readers and writers: JSON objects, staged output folders, and the memory a
read may take.

:func:`staged_folder` is the one way this package writes a folder: into a hidden temporary folder
beside the destination, renamed into place only when complete. A crash (even ``kill -9``) can leave
such a partial folder behind; the next write into the same destination finds partials whose writer is
gone (it no longer holds the lock on the partial's owner file), removes them and reports them, so a killed 70B merge
does not leave 100 GB of litter.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

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


def plain_relative(name: str) -> bool:
    """Whether ``name`` stays inside the folder it is joined to: relative, no '..', no backslash or NUL."""
    parts = name.split("/")
    return (
        bool(name)
        and not name.startswith("/")
        and "\\" not in name
        and "\0" not in name
        and all(p not in ("", ".", "..") for p in parts)
    )


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
        raise InputError(
            f"{path} is a symbolic link to {target}, outside {folder}: its contents are not copied",
            hint="replace the link with the file itself (cp --dereference) if you trust it, or remove it",
        )
    return path


def _meminfo() -> dict[str, int]:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * 1024
    return out


def _cgroup_room() -> int | None:
    """What this process's cgroup (a pod's memory limit) still lets it allocate; None without a limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit, usage = Path(limit_file).read_text().strip(), Path(usage_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit() and int(limit) < 1 << 60:
            return max(int(limit) - int(usage), 0)
    return None


def _rlimit_room() -> int | None:
    """What ``ulimit -d`` / ``ulimit -v`` still let this process allocate; None without a limit."""
    import resource

    status = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                status[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        return None
    rooms = []
    for limit, used in ((resource.RLIMIT_DATA, "VmData"), (resource.RLIMIT_AS, "VmSize")):
        soft = resource.getrlimit(limit)[0]
        if soft != resource.RLIM_INFINITY and used in status:
            rooms.append(max(soft - status[used], 0))
    return min(rooms) if rooms else None


def available_memory() -> int | None:
    """Bytes this process can still allocate: the least of the machine's available memory (with free swap), the
    cgroup's room (a pod's limit, which /proc/meminfo does not show) and the process limits; None where unknown."""
    info = _meminfo()
    rooms = [r for r in (_cgroup_room(), _rlimit_room()) if r is not None]
    if "MemAvailable" in info:
        rooms.append(info["MemAvailable"] + info.get("SwapFree", 0))
    return min(rooms) if rooms else None


def require_memory(nbytes: int, *, what: str, hint: str) -> None:
    """Refuse (exit 3, before anything is read) to read ``nbytes`` into memory that cannot hold them, instead of
    letting the read die of MemoryError halfway with a traceback (or the kernel's OOM killer)."""
    room = available_memory()
    if room is not None and nbytes > room:
        raise InputError(
            f"{what} needs {human_bytes(nbytes)} ({nbytes} bytes) of memory, but this process can "
            f"allocate {human_bytes(room)} ({room} bytes) now",
            hint=hint,
        )


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


def _owner_alive(partial: Path) -> bool:
    """Whether the writer of ``partial`` still runs, wherever it runs.

    The writer holds an exclusive flock on the owner file for as long as it writes; the kernel drops it when the
    process dies (``kill -9`` included), and on NFSv4 the server drops it when the client's lease ends, so the test
    holds across hosts: two publish Jobs in different pods are both PID 1, which a PID cannot tell apart. Only where
    the file system has no locks does the owner's host and PID decide (a writer on another host counts as alive).
    """

    try:
        fh = open(partial / _OWNER_FILE, "r+")
    except FileNotFoundError:
        return False  # owner files are made before the folder gets its name: none means a crash or an old version
    except OSError:
        return True  # cannot tell: never remove what may be another writer's
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # no locks on this file system
            try:
                owner = json.loads(fh.read())
                pid, start, host = int(owner["pid"]), owner.get("start"), owner.get("host")
            except (ValueError, KeyError, TypeError):
                return False
            return host != socket.gethostname() or _alive(pid, start)
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def remove_stale_partials(output: Path) -> list[StalePartial]:
    """Remove ``.NAME.partial-*`` folders beside ``output`` whose writer is gone; return what went."""
    output = Path(output).resolve()
    if not output.parent.is_dir():
        return []
    removed = []
    making = [
        c
        for c in output.parent.glob(f".{output.name}.making-*")  # a crash before the folder was named
        if (c / _OWNER_FILE).exists() or time.time() - c.stat().st_mtime > 600
    ]
    for cand in [*output.parent.glob(f".{output.name}.partial-*"), *making]:
        if not cand.is_dir() or _owner_alive(cand):
            continue  # another write into the same output is running right now (here or on another host)
        try:
            pid = int(json.loads((cand / _OWNER_FILE).read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            pid = None
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
        raise OutputError(
            f"not enough free space for {what}: it needs {human_bytes(required)} "
            f"({required} bytes) but {probe} has {human_bytes(free)} ({free} bytes) free",
            hint="free some space, or write the output to another disk",
        )


@contextmanager
def staged_folder(
    output: Path, *, force: bool, required_bytes: int = 0, what: str = "the output"
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
    # a unique name (not the PID: every pod's first process is PID 1), owned and locked before it gets that name
    unique = uuid.uuid4().hex[:12]
    tmp = output.parent / f".{output.name}.partial-{unique}"
    making = output.parent / f".{output.name}.making-{unique}"
    making.mkdir()
    owner = open(making / _OWNER_FILE, "w")
    try:
        fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass  # a file system without locks: the owner's host and PID below decide
    owner.write(json.dumps({"pid": os.getpid(), "start": _process_start(os.getpid()), "host": socket.gethostname()}))
    owner.flush()
    making.rename(tmp)
    staged = StagedFolder(tmp, output, stale)
    try:
        yield staged
        (tmp / _OWNER_FILE).unlink()
        owner.close()
        fsync_dir(tmp)
        _commit(tmp, output, force)
    except OSError as e:
        owner.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(output.parent).free
            raise OutputError(
                f"the disk filled up while writing {what} into {output.parent} "
                f"({human_bytes(free)} free now); nothing was left behind",
                hint="free some space, or write the output to another disk",
            ) from e
        raise
    except BaseException:
        owner.close()
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
