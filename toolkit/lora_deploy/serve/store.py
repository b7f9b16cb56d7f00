"""The adapter store: one folder that every replica serves adapters from, through vLLM's filesystem resolver.

vLLM 0.32's ``lora_filesystem_resolver`` loads ``DIR/<model>`` on the first request that names an unknown model,
when ``DIR/<model>/adapter_config.json`` says ``peft_type: LORA`` and its ``base_model_name_or_path`` equals the
server's ``--model`` string exactly. A folder shared by every replica (a ReadWriteMany volume in Kubernetes) thus
serves every adapter published into it, on every replica, before and after restarts, with no restart.

What this module adds to a bare folder, so that what the servers see is always whole and always servable:

- a **record** (``DIR/.lora-deploy/store.json``): the ``--model`` string vLLM compares against, the base's shape
  and the largest rank the servers accept. A server of another base, or with a smaller rank limit, is refused
  (exit 3) instead of silently never loading anything;
- **publish**: pre-flight against the store's base and rank limit (the same as ``dynamic``'s), the adapter's
  ``base_model_name_or_path`` rewritten to the ``--model`` string (the user's value kept in the adapter's publish
  record), and an atomic switch: each version is written whole under ``.lora-deploy/versions/NAME/`` and
  ``DIR/NAME`` is a relative symlink swapped in one ``rename``. A killed publish leaves nothing at ``DIR/NAME``;
- **replace**: a new version under a new path, and each replica named with ``--endpoint`` that already loaded the
  adapter is told to load the new path in place. A new *path* matters: vLLM keys prefix-cache blocks by adapter
  name and path, so reloading changed weights from the same path could reuse blocks of the old weights;
- **retire**: the name and every version leave the volume (vLLM does not refuse ``..`` or ``/`` in model names,
  so anything left anywhere under DIR stays loadable by a crafted name).

Every change to the links happens under an exclusive lock on ``.lora-deploy/lock``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from lora_deploy import __version__
from lora_deploy._files import contained_file, fsync_dir, remove_stale_partials, staged_folder
from lora_deploy.errors import AdminError, InputError, LoraDeployError, OutputError
from lora_deploy.hub import ResolvedRef
from lora_deploy.model.adapter import CONFIG_FILE
from lora_deploy.serve.flags import ALLOWED_LORA_RANKS, model_name_problem

META_DIR = ".lora-deploy"
RECORD_FILE = "store.json"
PUBLISH_FILE = "lora-deploy-publish.json"  # inside each version: where it came from, the user's original base


@dataclass(frozen=True)
class BaseShape:
    """The numbers an adapter's tensors must match: two bases with the same shape take the same adapters."""

    model_type: str
    hidden_size: int | None
    num_hidden_layers: int | None
    vocab_size: int | None

    @classmethod
    def from_config(cls, config: dict) -> BaseShape:
        sub = config.get("text_config")
        text: dict = sub if isinstance(sub, dict) else config
        return cls(
            str(config.get("model_type")),
            text.get("hidden_size"),
            text.get("num_hidden_layers"),
            text.get("vocab_size", config.get("vocab_size")),
        )

    def describe(self) -> str:
        return (
            f"{self.model_type}, hidden {self.hidden_size}, {self.num_hidden_layers} layers, "
            f"vocabulary {self.vocab_size}"
        )


@dataclass(frozen=True, kw_only=True)
class StoreRecord:
    """What the servers of one store are: the facts a publish must fit and a new server must match."""

    model: str  # the --model string vLLM compares base_model_name_or_path with, exactly
    served_model_name: str  # the base's API name: no adapter may take it
    base: str  # where lora-deploy reads the base for pre-flight (a folder or hub id)
    shape: BaseShape
    max_lora_rank: int  # the largest rank the servers accept (their --max-lora-rank)
    served_from: str  # the store's folder as the servers see it (a pod's mount path, or the local folder)
    created_by: str = f"lora-deploy {__version__}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, data: dict, source: Path) -> StoreRecord:
        try:
            return cls(**{**data, "shape": BaseShape(**data["shape"])})
        except (TypeError, KeyError) as e:
            raise InputError(
                f"{source} is not a lora-deploy store record ({e})",
                hint="it is written by lora-deploy dynamic --adapter-store or adapters publish; "
                "restore it or start a new store",
            ) from e

    def mismatch(self, other: StoreRecord) -> list[str]:
        """Why a server described by ``other`` cannot serve this store (empty when it can)."""
        problems = []
        if other.model != self.model:
            problems.append(
                f"the store's adapters name --model {self.model!r} as their base, this server's --model "
                f"is {other.model!r} (vLLM's resolver compares the two strings exactly)"
            )
        if other.shape != self.shape:
            problems.append(
                f"the store was made for a base of shape ({self.shape.describe()}), this server's base "
                f"is ({other.shape.describe()})"
            )
        if other.max_lora_rank < self.max_lora_rank:
            problems.append(
                f"the store accepts adapters up to rank {self.max_lora_rank}, this server's "
                f"--max-lora-rank is {other.max_lora_rank}: it could not load them all"
            )
        return problems


@dataclass(frozen=True, kw_only=True)
class StoredAdapter:
    """One adapter the store serves under ``name``."""

    name: str
    managed: bool  # published by lora-deploy (versioned, atomic); False for a folder copied in by hand
    rank: int | None = None
    version: str | None = None
    source: str | None = None
    original_base: str | None = None  # the base_model_name_or_path the user's adapter named
    published_at: str | None = None
    problem: str | None = None  # why vLLM's resolver would not load it (hand-copied folders only)


@dataclass(frozen=True)
class EndpointResult:
    """What one replica was told after a replace or retire."""

    url: str
    action: str  # "reloaded", "unloaded", "had not loaded it", or "failed"
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class PublishReport:
    """A published adapter, what was changed on the way in, and what the replicas were told."""

    adapter: StoredAdapter
    store: str
    path: str  # DIR/NAME
    replaced_version: str | None = None
    notes: tuple[str, ...] = ()
    endpoints: tuple[EndpointResult, ...] = ()


@dataclass(frozen=True, kw_only=True)
class RetireReport:
    name: str
    store: str
    removed_version: str | None
    notes: tuple[str, ...] = ()
    endpoints: tuple[EndpointResult, ...] = ()


def describe_server(
    base: ResolvedRef, model: str, served_model_name: str, max_lora_rank: int, served_from: str
) -> StoreRecord:
    """The record a server (or a publish that creates the store) stands for, from its base's config (``base`` as
    resolved where the user named it)."""
    if max_lora_rank not in ALLOWED_LORA_RANKS:
        raise InputError(
            f"--max-lora-rank {max_lora_rank} is not one vLLM accepts", hint=", ".join(map(str, ALLOWED_LORA_RANKS))
        )
    # a folder by its absolute path (readable from any working directory), a hub id as it is
    named = base.source if base.is_remote else str(base.path)
    return StoreRecord(
        model=model,
        served_model_name=served_model_name,
        base=named,
        shape=BaseShape.from_config(base.config),
        max_lora_rank=max_lora_rank,
        served_from=served_from,
    )


def read_record(folder: str | Path) -> StoreRecord | None:
    """The store's record, or None when ``folder`` holds none (yet)."""
    path = Path(folder) / META_DIR / RECORD_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is not readable JSON ({e})", hint="restore it, or start a new store") from e
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object", hint="restore it, or start a new store")
    return StoreRecord.from_json(data, path)


def open_store(folder: str | Path, server: StoreRecord | None = None, *, create: bool = True) -> StoreRecord | None:
    """The store at ``folder``: created (with ``server``'s record) if missing, else checked against ``server``.

    Raises InputError (exit 3) when ``server`` cannot serve the existing store, or when there is no store and no
    ``server`` to create it from. Without ``create`` nothing is written: None when there is no store yet.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"adapter store {folder} is a file, not a folder")
    record = read_record(folder) if folder.is_dir() else None
    if record is None and not create:
        return None
    if record is None:
        if server is None:
            raise InputError(
                f"{folder} is not an adapter store (no {META_DIR}/{RECORD_FILE})",
                hint="start a server with lora-deploy dynamic --base BASE --adapter-store DIR "
                "--max-lora-rank R, or pass --base, --max-lora-rank (and --model) to publish "
                "to create it",
            )
        meta = folder / META_DIR
        meta.mkdir(parents=True, exist_ok=True)
        with _locked(folder):
            if read_record(folder) is None:  # another process may have created it meanwhile
                tmp = meta / f".{RECORD_FILE}.{os.getpid()}"
                tmp.write_text(server.to_json())
                os.replace(tmp, meta / RECORD_FILE)
        record = read_record(folder)
        assert record is not None
    if server is not None:
        problems = record.mismatch(server)
        if problems:
            raise InputError(
                f"adapter store {folder} was made for another server: " + "; ".join(problems),
                hint=f"serve it with --model {record.model} and --max-lora-rank >= "
                f"{record.max_lora_rank} (the store's base: {record.base}), or use another "
                "folder for this base",
            )
    return record


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the store (flock: per host, and on NFSv4 across hosts)."""
    meta = folder / META_DIR
    meta.mkdir(parents=True, exist_ok=True)
    with open(meta / "lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _versions(folder: Path, name: str) -> Path:
    return folder / META_DIR / "versions" / name


def _current_version(folder: Path, name: str) -> str | None:
    link = folder / name
    if not link.is_symlink():
        return None
    target = Path(os.readlink(link))
    return target.name if target.parent == Path(META_DIR, "versions", name) else None


def _check_name(name: str, record: StoreRecord) -> None:
    problem = model_name_problem(name, adapter=True)
    if problem:
        raise InputError(f"adapter name {problem}", hint="pass --name NAME, for example --name support-v2")
    if name == record.served_model_name:
        raise InputError(
            f"adapter name {name!r} is the base's served name: requests for it would reach the base",
            hint="pass --name with another name",
        )
    if name.startswith(".") or name == META_DIR:
        raise InputError(f"adapter name {name!r} is reserved for the store's own files", hint="pass --name")


def publish(
    adapter: str,
    store: str | Path,
    *,
    name: str | None = None,
    replace: bool = False,
    endpoints: tuple[str, ...] = (),
    api_key: str | None = None,
    create: StoreRecord | None = None,
    revision: str | None = None,
) -> PublishReport:
    """Publish ``adapter`` (a folder or hub id) into the store as ``name`` (default: the folder's or repo's name).

    Pre-flight first (exit 3 for broken input, 4 for what the servers could not serve), then the files are written
    whole into a new version and ``DIR/NAME`` is switched to it atomically. With ``replace`` an existing name gets
    the new version; each of ``endpoints`` (replica URLs: name every replica) that already loaded the adapter loads
    the new version in place. The previous version stays on the volume (replicas told at the last replace read it
    when they reload an evicted adapter); older ones leave it. ``create`` is the record to create the store with
    when it does not exist yet (checked otherwise). A store that cannot be written is exit 5.
    """
    with _store_io(Path(store)):
        return _publish(
            adapter,
            Path(store),
            name=name,
            replace=replace,
            endpoints=endpoints,
            api_key=api_key,
            create=create,
            revision=revision,
        )


@contextmanager
def _store_io(folder: Path) -> Iterator[None]:
    """File-system errors on the store (a read-only mount, a folder another user owns) as exit 5, with the fix."""
    try:
        yield
    except LoraDeployError:
        raise
    except OSError as e:
        raise OutputError(
            f"adapter store {folder}: {e.strerror or e} ({e.filename or folder})",
            hint="the store must be writable by this user (in the pods: uid 2000, mounted read-write "
            "only for the publish Job)",
        ) from e


def _hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file of a published version, for its record (what was served, byte for byte)."""
    from lora_deploy.hub import sha256_file

    return {
        str(p.relative_to(folder)): sha256_file(p) or ""
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != PUBLISH_FILE
    }


def _publish(
    adapter: str,
    folder: Path,
    *,
    name: str | None,
    replace: bool,
    endpoints: tuple[str, ...],
    api_key: str | None,
    create: StoreRecord | None,
    revision: str | None,
) -> PublishReport:
    from lora_deploy.errors import UnsupportedError
    from lora_deploy.hub import resolve_headers
    from lora_deploy.serve.preflight import check_adapters, require_passed

    record = open_store(folder, create)
    assert record is not None  # created when missing
    # metadata first: pre-flight reads a hub or s3:// adapter's headers, and its weights only once they fit
    source = resolve_headers(adapter, kind="adapter", revision=revision)
    # a hub id's folder is its snapshot (a commit hash): default to the repository's name instead
    name = name or (source.source.rstrip("/").rsplit("/", 1)[-1] if source.is_remote else source.path.name)
    _check_name(name, record)
    link = folder / name
    if (link.exists() or link.is_symlink()) and not replace:
        raise OutputError(
            f"the store already has an adapter named {name!r}",
            hint="pass --replace to publish a new version under the same name, or --name NAME",
        )
    if link.exists() and not link.is_symlink():
        raise OutputError(
            f"{link} is a folder copied into the store by hand: it cannot be swapped atomically",
            hint=f"retire it first (lora-deploy adapters retire {name} --store {folder}), then publish",
        )
    staging = folder / META_DIR / "staging" / f"normalised-{uuid.uuid4().hex[:12]}"
    report = check_adapters(record.base, {name: source}, max_lora_rank=record.max_lora_rank, normalise_dir=staging)
    try:
        require_passed(report)
        checked = report.accepted[0]
        if checked.moe_3d:
            # vLLM's resolver builds its load request without is_3d_lora_weight, which fused expert LoRA needs
            raise UnsupportedError(
                f"{name}: LoRA on fused MoE expert parameters (target_parameters) cannot be served "
                "through vLLM's filesystem resolver, which does not mark it is_3d_lora_weight",
                hint="serve it as a startup adapter (dynamic --adapter NAME=PATH, or adapters: in "
                "the deploy spec), or merge it",
            )
        notes = list(report.notes)
        version = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{uuid.uuid4().hex[:8]}"
        versions = _versions(folder, name)
        versions.mkdir(parents=True, exist_ok=True)
        for partial in versions.glob(".*.partial-*"):  # litter of killed publishes, if their owner is gone
            remove_stale_partials(versions / partial.name[1:].split(".partial-")[0])
        with staged_folder(versions / version, force=False, what=f"adapter {name}") as staged:
            original = _copy_adapter(Path(checked.path), staged.path, record.model)
            if original != record.model:
                notes.append(
                    f"base_model_name_or_path was {original!r}; set to {record.model!r}, the servers' "
                    "--model, so vLLM's resolver loads it (the original is kept in the publish record)"
                )
            entry = StoredAdapter(
                name=name,
                managed=True,
                rank=checked.rank,
                version=version,
                source=source.source,
                original_base=original,
                published_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
            (staged.path / PUBLISH_FILE).write_text(
                json.dumps(
                    {
                        **asdict(entry),
                        "revision": source.revision,
                        "files": _hashes(staged.path),
                        "lora_deploy": __version__,
                    },
                    indent=2,
                )
                + "\n"
            )
            _fsync_tree(staged.path)
        with _locked(folder):
            if (link.exists() or link.is_symlink()) and not replace:  # appeared meanwhile
                shutil.rmtree(versions / version, ignore_errors=True)
                raise OutputError(
                    f"an adapter named {name!r} was published while this one was written",
                    hint="pass --replace to publish a new version",
                )
            if not (versions / version / CONFIG_FILE).is_file():
                raise OutputError(
                    f"version {version} of {name!r} disappeared before it was switched in (another "
                    "publish of the same name cleaned up)",
                    hint="publish it again",
                )
            previous = _current_version(folder, name)
            tmp = folder / f".{name}.link-{uuid.uuid4().hex[:12]}"
            os.symlink(Path(META_DIR, "versions", name, version), tmp)
            os.replace(tmp, link)  # the switch: a reader sees the old version or the new one, never a mixture
            fsync_dir(folder)
            # versions older than the previous one leave the volume (a crafted model name could reach them); the
            # previous one stays for replicas that were told to load it and may reload it after an eviction
            for old in versions.iterdir():
                if (
                    not old.name.startswith(".")
                    and old.name not in (version, previous)
                    and (previous is None or old.name < previous)
                ):
                    shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    results: tuple[EndpointResult, ...] = ()
    if previous is not None:
        served_path = f"{record.served_from.rstrip('/')}/{META_DIR}/versions/{name}/{version}"
        results = tuple(_reload(url, name, served_path, api_key) for url in endpoints)
        if not endpoints:
            notes.append(
                f"replicas that already loaded {name} keep serving version {previous} until they are told "
                "(adapters publish --replace --endpoint URL, naming every replica) or restarted, and they "
                "switch to the new files at their own moment when vLLM evicts and reloads the adapter, with "
                "prefix-cache blocks of the old weights: tell every replica"
            )
    out = PublishReport(
        adapter=entry,
        store=str(folder),
        path=str(link),
        replaced_version=previous,
        notes=tuple(notes),
        endpoints=results,
    )
    served_path = f"{record.served_from.rstrip('/')}/{META_DIR}/versions/{name}/{version}"
    _raise_for_endpoints(
        out.endpoints,
        f"{name} version {version} is published",
        f"lora-deploy adapters load {name} {served_path} --replace --url URL (for each replica listed), or restart it",
    )
    return out


def _copy_adapter(src: Path, dst: Path, model: str) -> str | None:
    """Copy an adapter folder's files (not its subfolders, such as training checkpoints) into ``dst``, with
    ``base_model_name_or_path`` set to ``model``; return the value it had."""
    for f in src.iterdir():
        if (f.is_file() or f.is_symlink()) and f.name not in (PUBLISH_FILE,):
            contained_file(f, src)  # never a link's bytes from outside the adapter into the shared store
            if f.name != CONFIG_FILE:
                shutil.copyfile(f, dst / f.name)
    config = json.loads((src / CONFIG_FILE).read_text())
    original = config.get("base_model_name_or_path")
    config["base_model_name_or_path"] = model
    (dst / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")  # written last: the resolver's signal
    return original


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(folder)


def _reload(url: str, name: str, path: str, api_key: str | None) -> EndpointResult:
    """Make one replica serve the new version: loaded there already -> load the new path in place."""
    from lora_deploy.serve.admin import reload_from

    try:
        done = reload_from(url, name, path, api_key)
    except LoraDeployError as e:
        return EndpointResult(url, "failed", e.message)
    return EndpointResult(url, "reloaded" if done else "had not loaded it")


def _unload(url: str, name: str, api_key: str | None) -> EndpointResult:
    from lora_deploy.serve.admin import forget

    try:
        done = forget(url, name, api_key)
    except LoraDeployError as e:
        return EndpointResult(url, "failed", e.message)
    return EndpointResult(url, "unloaded" if done else "had not loaded it")


def _raise_for_endpoints(results: tuple[EndpointResult, ...], done: str, fix: str) -> None:
    failed = [r for r in results if r.action == "failed"]
    if failed:
        listing = "\n".join(f"  - {r.url}: {r.detail}" for r in failed)
        raise AdminError(f"{done}, but {len(failed)} replica(s) could not be told:\n{listing}", hint=fix)


def replica_urls(host_port: str) -> tuple[str, ...]:
    """Every address a name resolves to, as replica URLs: ``NAME-pods.NS.svc:8000`` (the rollout's headless
    Service) gives one URL per ready server pod, so a publish or retire in the cluster tells every replica."""
    import socket

    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(
            f"--replicas {host_port!r} is not HOST:PORT", hint="for example --replicas support-pods.llm.svc:8000"
        )
    try:
        found = sorted({str(a[4][0]) for a in socket.getaddrinfo(host, int(port), proto=socket.IPPROTO_TCP)})
    except socket.gaierror as e:
        raise InputError(
            f"--replicas {host_port}: {host} does not resolve ({e})",
            hint="the headless Service NAME-pods.NAMESPACE.svc lists the ready server pods",
        ) from e
    return tuple(f"http://[{a}]:{port}" if ":" in a else f"http://{a}:{port}" for a in found)


def list_store(store: str | Path) -> tuple[StoredAdapter, ...]:
    """Every adapter the store's servers can be asked for: published ones and folders copied in by hand."""
    try:
        return _list_store(Path(store))
    except OSError as e:
        raise InputError(
            f"adapter store {store}: {e.strerror or e} ({e.filename or store})",
            hint="the store must be readable by this user",
        ) from e


def _list_store(folder: Path) -> tuple[StoredAdapter, ...]:
    record = open_store(folder)
    assert record is not None
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or not (entry / CONFIG_FILE).is_file():
            continue
        version = _current_version(folder, entry.name)
        if version is not None:
            try:
                meta = json.loads((entry / PUBLISH_FILE).read_text())
                found.append(StoredAdapter(**{k: meta.get(k) for k in StoredAdapter.__dataclass_fields__}))
                continue
            except (OSError, ValueError, TypeError):
                pass
        found.append(_hand_copied(entry, record))
    return tuple(found)


def _hand_copied(entry: Path, record: StoreRecord) -> StoredAdapter:
    try:
        config = json.loads((entry / CONFIG_FILE).read_text())
        base, rank = config.get("base_model_name_or_path"), config.get("r")
    except (OSError, ValueError, AttributeError):
        return StoredAdapter(name=entry.name, managed=False, problem=f"{CONFIG_FILE} is not readable JSON")
    problem = None
    if config.get("peft_type") != "LORA":
        problem = f"peft_type is {config.get('peft_type')!r}, not LORA"
    elif base != record.model:
        problem = f"base_model_name_or_path is {base!r}, not the servers' --model {record.model!r}"
    return StoredAdapter(
        name=entry.name,
        managed=False,
        rank=rank if isinstance(rank, int) else None,
        original_base=base,
        problem=problem,
    )


def retire(
    name: str, store: str | Path, *, endpoints: tuple[str, ...] = (), api_key: str | None = None
) -> RetireReport:
    """Take ``name`` out of the store: the name disappears first (no replica resolves it any more), then each of
    ``endpoints`` (name every replica) that loaded it unloads it, then every version leaves the volume. A store that
    cannot be written is exit 5; files that could not be removed are an error, not a success."""
    folder = Path(store)
    with _store_io(folder):
        return _retire(name, folder, endpoints=endpoints, api_key=api_key)


def _retire(name: str, folder: Path, *, endpoints: tuple[str, ...], api_key: str | None) -> RetireReport:
    open_store(folder)
    if not name or "/" in name or name.startswith(".") or name == META_DIR:
        raise InputError(f"{name!r} is not an adapter name", hint=f"see lora-deploy adapters list --store {folder}")
    link = folder / name
    with _locked(folder):
        if not (link.exists() or link.is_symlink()):
            raise InputError(
                f"the store has no adapter named {name!r}", hint=f"lora-deploy adapters list --store {folder}"
            )
        version = _current_version(folder, name)
        versions = _versions(folder, name)
        # exactly what is retired, recorded under the lock: a publish of the same name while the replicas are told
        # (the lock is not held then) writes a new version, which stays
        retired = [v for v in versions.iterdir() if not v.name.startswith(".")] if versions.is_dir() else []
        gone = folder / META_DIR / f"retired-{name}-{uuid.uuid4().hex[:12]}"
        os.replace(link, gone)  # the name disappears in one step
        fsync_dir(folder)
    results = tuple(_unload(url, name, api_key) for url in endpoints)  # before the files go: see below
    with _locked(folder):
        if gone.is_symlink():
            gone.unlink()
        else:
            shutil.rmtree(gone, ignore_errors=True)
        for v in retired:
            shutil.rmtree(v, ignore_errors=True)
        left = [str(p) for p in (gone, *retired) if p.exists() or p.is_symlink()]
    if left:
        raise OutputError(
            f"{name} is no longer served from the store, but these could not be removed: "
            f"{', '.join(left)} (a crafted model name could still load them)",
            hint="remove them as their owner, or with the permissions the store's files need",
        )
    # a replica that still holds the adapter reloads it from its path after an eviction; with the files gone that
    # load fails inside vLLM's engine, so every replica must be told
    notes = (
        ()
        if endpoints
        else (
            f"replicas that already loaded {name} keep serving it until they are told "
            "(adapters retire --endpoint URL for every replica, or adapters unload) or "
            "restarted; one that evicts and reloads it meanwhile finds its files gone",
        )
    )
    out = RetireReport(name=name, store=str(folder), removed_version=version, notes=notes, endpoints=results)
    _raise_for_endpoints(
        out.endpoints,
        f"{name} is retired from the store",
        f"lora-deploy adapters unload {name} --force --url URL (for each replica listed), or restart it",
    )
    return out


__all__ = [
    "BaseShape",
    "EndpointResult",
    "PublishReport",
    "RetireReport",
    "StoreRecord",
    "StoredAdapter",
    "describe_server",
    "list_store",
    "open_store",
    "publish",
    "read_record",
    "replica_urls",
    "retire",
]
