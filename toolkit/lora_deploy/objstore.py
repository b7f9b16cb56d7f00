"""Models and adapters in object storage: ``s3://BUCKET/PREFIX`` read into a local cache folder.

boto3 signs the requests and finds the credentials the standard way (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, a pod's or an instance's role), ``AWS_REGION`` and ``AWS_ENDPOINT_URL`` (for
S3-compatible stores such as MinIO or Ceph): nothing new to learn, and no secret passes through lora-deploy.

- **What is read**: the objects directly under ``PREFIX/`` (and below it) that a model or adapter folder needs, as
  the hub reader takes them (configs, tokenizer files, ``*.safetensors``; pickles only when allowed).
- **Metadata first**: :func:`fetch` with ``headers_only`` reads the small files and, of each safetensors file, its
  8-byte header length and its header (two ranged GETs), written as a sparse stand-in of the file's size; so
  pre-flight refuses a bad adapter without downloading a weight.
- **Downloads**: every file in 64 MiB ranges, several at once, each written at its offset into a staging copy;
  the ranges done are recorded beside it, so an interrupted download resumes where it stopped. Every range asks
  for the ETag that was listed (``If-Match``): an object replaced meanwhile is refused, never mixed.
- **Cache**: ``~/.cache/lora-deploy/s3/BUCKET/PREFIX/<digest of every key, size and ETag>`` (or under
  ``LORA_DEPLOY_CACHE``): a second run lists the prefix and downloads nothing. Beside each folder a manifest names
  the ``s3://`` source and each file's ETag and sha256, for provenance records.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_deploy._files import check_free_space, plain_relative
from lora_deploy.errors import InputError

SCHEME = "s3://"
PART = 64 << 20  # bytes per ranged GET
WORKERS = 8  # ranged GETs at once
MAX_HEADER = 100_000_000  # safetensors refuses a header larger than this, and so does this reader
MAX_OBJECTS = 10_000
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def is_s3(ref: object) -> bool:
    return str(ref).startswith(SCHEME)


@dataclass(frozen=True, kw_only=True)
class S3Object:
    key: str
    rel: str  # the path inside the folder
    size: int
    etag: str


def parse_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET/PREFIX`` -> (bucket, ``PREFIX/``); an InputError naming what is wrong otherwise."""
    rest = url[len(SCHEME) :]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise InputError(
            f"{url}: {bucket!r} is not an S3 bucket name",
            hint="s3://BUCKET/PREFIX, with a bucket of 3 to 63 lower-case letters, digits, '.' and '-'",
        )
    prefix = prefix.strip("/")
    if prefix and not plain_relative(prefix):
        raise InputError(f"{url}: the prefix {prefix!r} is not a plain folder path", hint="no '.', '..' or '//'")
    return bucket, (prefix + "/") if prefix else ""


def _secrets() -> list[str]:
    return [v for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN") if (v := os.environ.get(k))]


def _scrub(text: str) -> str:
    for secret in _secrets():
        text = text.replace(secret, "<redacted>")
    return text


@contextlib.contextmanager
def _errors(url: str) -> Iterator[None]:
    """botocore's failures as InputErrors (exit 3) that name the URL, never a secret, and say what to do."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    try:
        yield
    except (NoCredentialsError, PartialCredentialsError) as e:
        raise InputError(
            f"{url}: no usable AWS credentials ({_scrub(str(e))})",
            hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or run where a role applies)",
        ) from None
    except EndpointConnectionError as e:
        raise InputError(
            f"{url}: the object store does not answer ({_scrub(str(e))})",
            hint="check AWS_ENDPOINT_URL (MinIO, Ceph) or AWS_REGION, and the network",
        ) from None
    except ClientError as e:
        error = e.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        hints = {
            "NoSuchBucket": "check the bucket's name (and AWS_REGION / AWS_ENDPOINT_URL: it may live elsewhere)",
            "AccessDenied": "the credentials in use may not read it: check the key's or role's policy (s3:GetObject, "
            "s3:ListBucket)",
            "InvalidAccessKeyId": "the access key is unknown to this store: check AWS_ACCESS_KEY_ID (or AWS_PROFILE)",
            "SignatureDoesNotMatch": "the secret key does not match the access key: check AWS_SECRET_ACCESS_KEY",
            "PreconditionFailed": "an object changed while it was read: run the command again",
        }
        denied = code in ("AccessDenied", "403") or status == 403
        raise InputError(
            f"{url}: {code or status}: {_scrub(str(error.get('Message') or e))}",
            hint=hints.get(code) or (hints["AccessDenied"] if denied else "check the URL and the credentials"),
        ) from None
    except BotoCoreError as e:
        raise InputError(
            f"{url}: {_scrub(str(e))}", hint="check the URL, AWS_ENDPOINT_URL and the credentials"
        ) from None


def client() -> Any:
    """An S3 client from the standard AWS configuration, with bounded retries and timeouts (a dead endpoint fails
    in seconds, not minutes)."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        read_timeout=60,
        max_pool_connections=WORKERS * 2,
    )
    return boto3.session.Session().client("s3", config=config)


def list_folder(s3: Any, url: str, patterns: list[str]) -> list[S3Object]:
    """The objects under ``url``'s prefix whose file names match ``patterns`` (every key inside the folder)."""
    bucket, prefix = parse_url(url)
    found: list[S3Object] = []
    with _errors(url):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                key = item["Key"]
                rel = key[len(prefix) :]
                if not rel or rel.endswith("/"):
                    continue  # a folder marker
                if not plain_relative(rel):
                    raise InputError(f"{url}: the object {key!r} is not a plain path inside the folder")
                if any(fnmatch.fnmatch(rel.rsplit("/", 1)[-1], p) for p in patterns):
                    found.append(S3Object(key=key, rel=rel, size=int(item["Size"]), etag=str(item["ETag"])))
                if len(found) > MAX_OBJECTS:
                    raise InputError(f"{url}: more than {MAX_OBJECTS} files under this prefix: not a model folder")
    if not found:
        raise InputError(
            f"{url}: no model or adapter files under this prefix",
            hint="the URL names a folder: s3://BUCKET/PREFIX holding config.json or adapter_config.json and "
            "*.safetensors",
        )
    return found


def _cache_root() -> Path:
    return Path(os.environ.get("LORA_DEPLOY_CACHE") or Path.home() / ".cache" / "lora-deploy") / "s3"


def digest(objects: list[S3Object]) -> str:
    """What identifies a folder's contents: every file's path, size and ETag (a commit, for a hub repository)."""
    text = json.dumps(sorted((o.rel, o.size, o.etag) for o in objects))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass(frozen=True, kw_only=True)
class Fetched:
    """A folder read from ``source``: where it lies, the digest of its contents, and whether it holds only headers."""

    source: str
    path: Path
    digest: str
    headers_only: bool


def fetch(
    url: str, *, patterns: list[str], headers_only: bool = False, expect: str | None = None, s3: Any = None
) -> Fetched:
    """The folder at ``url`` in the cache, downloaded (or, with ``headers_only``, its configs and safetensors
    headers) unless the cache already holds these very objects. ``expect``: the digest read before (by a
    headers-only fetch); objects changed since are refused rather than mixed."""
    s3 = s3 or client()
    bucket, prefix = parse_url(url)
    objects = list_folder(s3, url, patterns)
    found = digest(objects)
    if expect is not None and expect != found:
        raise InputError(
            f"{url}: its objects changed since they were checked (contents {expect} then, {found} now)",
            hint="run the command again, so the files checked are the files served",
        )
    folder = _cache_root() / bucket / (prefix.strip("/") or "_") / (found + ("-headers" if headers_only else ""))
    if folder.is_dir():  # renamed into place whole: a folder there is complete
        return Fetched(source=url, path=folder, digest=found, headers_only=headers_only)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one writer per folder, across processes
        if not folder.is_dir():
            _fill(s3, url, bucket=bucket, objects=objects, folder=folder, headers_only=headers_only)
    return Fetched(source=url, path=folder, digest=found, headers_only=headers_only)


def _fill(s3: Any, url: str, *, bucket: str, objects: list[S3Object], folder: Path, headers_only: bool) -> None:
    """Download ``objects`` into ``folder`` through a staging folder kept across interruptions."""
    staging = folder.with_name(folder.name + ".partial")
    staging.mkdir(exist_ok=True)
    whole = [o for o in objects if not (headers_only and o.rel.endswith(".safetensors"))]
    check_free_space(staging, sum(o.size for o in whole), what=url)
    with _errors(url):
        for o in objects:
            if o not in whole:
                _write_stub(s3, url, bucket, o, staging / o.rel)
        _download(s3, bucket, whole, staging, url)
    hashes = {o.rel: _sha256(staging / o.rel) for o in whole}
    manifest = {
        "source": url,
        "headers_only": headers_only,
        "files": {o.rel: {"size": o.size, "etag": o.etag, "sha256": hashes.get(o.rel)} for o in objects},
    }
    for leftover in staging.rglob("*.parts"):
        leftover.unlink()
    folder.with_name(folder.name + ".json").write_text(json.dumps(manifest, indent=2) + "\n")
    staging.rename(folder)


def _write_stub(s3: Any, url: str, bucket: str, o: S3Object, target: Path) -> None:
    """A safetensors file's header, at its place in a sparse file of the object's size (its data a hole)."""
    if o.size < 8:
        raise InputError(f"{url}: {o.rel} is {o.size} bytes, too short to be a safetensors file")
    head = s3.get_object(Bucket=bucket, Key=o.key, Range="bytes=0-7", IfMatch=o.etag)["Body"].read()
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER or 8 + n > o.size:
        raise InputError(f"{url}: {o.rel} declares a header of {n} bytes: not a safetensors file")
    header = s3.get_object(Bucket=bucket, Key=o.key, Range=f"bytes=8-{7 + n}", IfMatch=o.etag)["Body"].read()
    if len(header) != n:
        raise InputError(f"{url}: {o.rel}: the store sent {len(header)} header bytes of {n}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as f:
        f.write(head + header)
        f.truncate(o.size)


def _download(s3: Any, bucket: str, objects: list[S3Object], staging: Path, url: str) -> None:
    """Every object into ``staging``, in ranges, several at once; resumes from each file's record of ranges done."""
    from lora_deploy.output import out

    jobs: list[tuple[S3Object, int]] = []
    done: dict[str, set[int]] = {}
    for o in objects:
        target = staging / o.rel
        target.parent.mkdir(parents=True, exist_ok=True)
        record = target.with_name(target.name + ".parts")
        try:
            kept = json.loads(record.read_text()) if target.is_file() else {}
        except (OSError, ValueError):
            kept = {}
        parts = set(kept.get("done", [])) if kept.get("etag") == o.etag and kept.get("size") == o.size else set()
        if not parts:
            with open(target, "wb") as f:
                f.truncate(o.size)
        done[o.rel] = parts
        jobs += [(o, i) for i in range(max(1, -(-o.size // PART))) if i not in parts]
    total = sum(min(PART, o.size - i * PART) for o, i in jobs)
    lock = threading.Lock()
    bar = None
    if out.progress and total:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"download {url}", leave=False)

    def one(job: tuple[S3Object, int]) -> None:
        o, i = job
        start, end = i * PART, min(o.size, (i + 1) * PART) - 1
        target = staging / o.rel
        if o.size:
            body = s3.get_object(Bucket=bucket, Key=o.key, Range=f"bytes={start}-{end}", IfMatch=o.etag)["Body"]
            fd = os.open(target, os.O_WRONLY)
            try:
                offset = start
                while chunk := body.read(8 << 20):
                    os.pwrite(fd, chunk, offset)
                    offset += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                if offset != end + 1:
                    raise InputError(f"{url}: {o.rel}: the store sent {offset - start} bytes of {end + 1 - start}")
                os.fsync(fd)
            finally:
                os.close(fd)
        with lock:  # the record of ranges done, for a resume
            done[o.rel].add(i)
            record = target.with_name(target.name + ".parts")
            record.write_text(json.dumps({"etag": o.etag, "size": o.size, "done": sorted(done[o.rel])}))

    try:
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            for _ in pool.map(one, jobs):
                pass
    finally:
        if bar is not None:
            bar.close()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()
