"""Resolve a model or adapter reference (a local folder, a Hugging Face hub id, or ``s3://BUCKET/PREFIX``) to a
local folder.

Hub ids go through ``huggingface_hub``'s cache, so ``HF_HUB_OFFLINE=1`` works on models that were
downloaded before; ``s3://`` URLs through :mod:`lora_deploy.objstore`'s cache (keyed by the objects' ETags);
nothing here talks to the network for a local path.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from lora_deploy import objstore
from lora_deploy._files import plain_relative, read_json_object
from lora_deploy.errors import InputError

# What we need from a hub repo (model or adapter): weights, configs, tokenizer files. Never pickles by default.
_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "tokenizer*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ResolvedRef:
    """A base or adapter reference, resolved once where the user named it and passed down as this record: what the
    user typed, where its files lie on disk now, and its config (read once, on first use).

    ``source`` is what the user typed; ``revision`` is the hub commit (None for local folders), so a provenance
    record can name exactly what was merged. ``headers_only``: ``path`` holds the configs and the safetensors
    headers of a hub repository, not its weights (:func:`resolve_headers`); :meth:`fetched` downloads them.
    """

    source: str
    path: Path
    revision: str | None = None
    headers_only: bool = False

    @property
    def is_remote(self) -> bool:
        """From the hub or an object store (``revision``: the commit, or the digest of the objects' ETags)."""
        return self.revision is not None

    @functools.cached_property
    def config(self) -> dict:
        """Its ``config.json`` (a model's; an adapter folder has none), read on first use and kept."""
        return read_json_object(
            self.path / "config.json",
            missing="the base folder is not a Hugging Face model",
            hint="pass the folder that holds config.json and *.safetensors",
        )

    def fetched(self, *, kind: str = "base model") -> ResolvedRef:
        """This reference with its weights on disk: itself, or the download of the very commit its headers were
        read from (nothing else is resolved again)."""
        if not self.headers_only:
            return self
        return resolve_ref(self.source, kind=kind, revision=self.revision)


def resolve_ref(
    ref: str | os.PathLike, *, kind: str, revision: str | None = None, allow_pickle: bool = False
) -> ResolvedRef:
    """Return the local folder for ``ref``: an existing folder as is, else a hub id from the HF cache."""
    text = str(ref)
    if objstore.is_s3(text):  # revision: the digest a headers-only read saw (the objects must still be those)
        patterns = _PATTERNS + (["*.bin"] if allow_pickle else [])
        got = objstore.fetch(text, patterns=patterns, expect=revision)
        return ResolvedRef(source=text, path=got.path, revision=got.digest)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(
                f"{kind} {text!r} is a file; expected a folder with config and weights",
                hint=f"pass the folder that contains the {kind}'s files",
            )
        return ResolvedRef(source=text, path=path.resolve())
    if not _HUB_ID.fullmatch(text) or text.startswith((".", "/", "~")):
        raise InputError(
            f"{kind} folder {text!r} does not exist",
            hint="check the path, or pass a Hugging Face hub id such as org/name",
        )
    return _download(text, kind=kind, revision=revision, allow_pickle=allow_pickle)


# What a check reads from a hub repo besides the weights' headers: configs and tokenizer files, never weights.
_METADATA_PATTERNS = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja", "tokenizer*"]


def resolve_headers(ref: str | os.PathLike, *, kind: str, revision: str | None = None) -> ResolvedRef:
    """A folder with ``ref``'s configs and its safetensors *headers*, for checks that never read a weight (pre-flight,
    ``dynamic --dry-run``): a local folder as is; for a hub id, the small files from the hub and, for each
    safetensors file, a sparse stand-in written from ``get_safetensors_metadata`` (its header, with the data
    region a hole on disk), so a 70B base costs a few megabytes instead of 140 GB.
    """
    text = str(ref)
    if objstore.is_s3(text):
        got = objstore.fetch(text, patterns=_METADATA_PATTERNS + ["*.safetensors"], headers_only=True)
        return ResolvedRef(source=text, path=got.path, revision=got.digest, headers_only=True)
    path = Path(text).expanduser()
    if path.exists() or not _HUB_ID.fullmatch(text) or text.startswith((".", "/", "~")):
        return resolve_ref(ref, kind=kind, revision=revision)
    import json
    import shutil

    from huggingface_hub import get_safetensors_metadata, snapshot_download

    cached = _cached_snapshot(text, revision)
    if cached is not None:  # the whole repository is in the local cache already: read it there, offline too
        return cached

    with _hub_errors(kind, text, "read its config and safetensors headers"):
        local = Path(snapshot_download(text, revision=revision, allow_patterns=_METADATA_PATTERNS))
        meta = get_safetensors_metadata(text, revision=revision)
    root = Path(os.environ.get("LORA_DEPLOY_CACHE") or Path.home() / ".cache" / "lora-deploy")
    target = root / "hub-headers" / text.replace("/", "--") / local.name
    if not (target / ".complete").exists():
        import uuid

        staging = target.with_name(target.name + f".partial-{uuid.uuid4().hex[:12]}")  # not a PID: pods share 1
        shutil.copytree(local, staging, symlinks=False)
        for name, file_meta in meta.files_metadata.items():
            if not plain_relative(name):  # an index's shard names are the repo's to choose: never a path out
                shutil.rmtree(staging, ignore_errors=True)
                raise InputError(
                    f"{kind} {text!r}: its safetensors index names a shard {name!r} outside the repository's folder",
                    hint="a repository's shard names are plain file names; this one cannot be read safely",
                )
            header: dict[str, object] = {
                t: {"dtype": i.dtype, "shape": list(i.shape), "data_offsets": list(i.data_offsets)}
                for t, i in file_meta.tensors.items()
            }
            if file_meta.metadata:
                header["__metadata__"] = file_meta.metadata
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            end = max((i.data_offsets[1] for i in file_meta.tensors.values()), default=0)
            stub = staging / name
            stub.parent.mkdir(parents=True, exist_ok=True)
            with open(stub, "wb") as f:
                f.write(len(raw).to_bytes(8, "little") + raw)
                f.truncate(8 + len(raw) + end)  # a hole: the data is never read here
        (staging / ".complete").write_text(text + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return ResolvedRef(source=text, path=target, revision=local.name, headers_only=True)


def _cached_snapshot(repo_id: str, revision: str | None) -> ResolvedRef | None:
    """The repository's snapshot in the local Hugging Face cache, when it holds its configs and safetensors files
    (nothing is downloaded, and ``HF_HUB_OFFLINE=1`` works); None when it is not there."""
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_PATTERNS, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache (or an unusable cache): the hub is asked instead
        return None
    if not any(local.glob("*.safetensors")) or not any(local.glob("*config.json")):
        return None
    return ResolvedRef(source=repo_id, path=local, revision=local.name)


@contextlib.contextmanager
def _hub_errors(kind: str, repo_id: str, doing: str):
    """Hub failures as InputErrors that say what was asked and what to do (offline cache miss, no such repo...)."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        yield
    except LocalEntryNotFoundError as e:
        raise InputError(
            f"{kind} {repo_id!r} is not in the local Hugging Face cache and the hub cannot be reached",
            hint="download it first (hf download ...) or unset HF_HUB_OFFLINE",
        ) from e
    except RepositoryNotFoundError as e:
        raise InputError(
            f"{kind} {repo_id!r} is neither a local folder nor a hub repository you can access",
            hint="check the spelling, or log in with `hf auth login` for a gated repo",
        ) from e
    except (HfHubHTTPError, OSError, ValueError) as e:  # NotASafetensorsRepoError included
        raise InputError(f"could not {doing} for {kind} {repo_id!r} from the hub: {e}") from e


def _download(repo_id: str, *, kind: str, revision: str | None, allow_pickle: bool) -> ResolvedRef:
    from huggingface_hub import snapshot_download

    patterns = list(_PATTERNS)
    if allow_pickle:
        patterns.append("*.bin")
    with _hub_errors(kind, repo_id, "fetch its files"):
        local = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    local_path = Path(local)
    # snapshot folders are named by commit hash: .../snapshots/<sha>
    return ResolvedRef(source=repo_id, path=local_path, revision=local_path.name)


def sha256_file(path: Path, *, chunk: int = 16 << 20, stop: threading.Event | None = None) -> str | None:
    """sha256 of a file, read in large chunks (hashlib releases the GIL, so this can run in a thread).

    With ``stop``, a hash running in a thread gives up (returns None) soon after the event is set, so a
    failing merge does not wait for a 5 GB shard to finish hashing before it reports.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if stop is not None and stop.is_set():
                return None
            h.update(block)
    return h.hexdigest()


def local_config(ref: str | None) -> Path | None:
    """``config.json`` of a model named ``ref`` when it is readable here without a download: a local folder, or
    a hub id already in the Hugging Face cache. None otherwise."""
    if not ref:
        return None
    path = Path(str(ref)).expanduser()
    if path.is_dir():
        return path / "config.json" if (path / "config.json").is_file() else None
    if not _HUB_ID.fullmatch(str(ref)):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(ref), "config.json")
    except Exception:  # noqa: BLE001 - an unusable cache is the same as no cache here
        return None
    return Path(found) if isinstance(found, str) else None
