"""The published CustomResourceDefinitions lora-deploy's manifests are held to, and where to get them.

The CRD files are other projects' release artifacts, so they are never copied into this repository: this module
keeps their table (kind, upstream URL at a release tag, sha256), downloads them into a cache folder with
``lora-deploy crds`` (``make crds``), and checks every file's sha256 before it is kept. ``manifests --crd DIR``
and the test suite then read them from there.

The cache folder is ``$LORA_DEPLOY_CRDS`` when set, else ``$XDG_CACHE_HOME/lora-deploy/crds`` (by default
``~/.cache/lora-deploy/crds``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from lora_deploy.errors import InputError, OutputError

CRDS_ENV = "LORA_DEPLOY_CRDS"
_MAX_CRD_BYTES = 8 << 20  # the largest published CRD here (HTTPRoute) is under 1 MiB


@dataclass(frozen=True, kw_only=True)
class PublishedCrd:
    """One published CRD file: what it defines, where its project publishes it, and its sha256 at that tag."""

    file: str  # the file name upstream (and in the cache folder)
    kind: str
    api_version: str  # group/version of the custom resources lora-deploy renders
    repository: str  # github owner/name
    tag: str
    path: str  # the file's path in the repository at the tag
    sha256: str

    @property
    def url(self) -> str:
        return f"https://raw.githubusercontent.com/{self.repository}/{self.tag}/{self.path}"


def _crd(
    *, file: str, kind: str, api_version: str, repository: str, tag: str, folder: str, sha256: str
) -> PublishedCrd:
    return PublishedCrd(
        file=file,
        kind=kind,
        api_version=api_version,
        repository=repository,
        tag=tag,
        path=f"{folder}/{file}",
        sha256=sha256,
    )


_GIE = "kubernetes-sigs/gateway-api-inference-extension"
_PROM = "prometheus-operator/prometheus-operator"
_PROM_DIR = "example/prometheus-operator-crd"
# Each file byte for byte as its project publishes it at the tag (the git blob at that tag).
PUBLISHED_CRDS: tuple[PublishedCrd, ...] = (
    _crd(
        file="leaderworkerset.x-k8s.io_leaderworkersets.yaml",
        kind="LeaderWorkerSet",
        api_version="leaderworkerset.x-k8s.io/v1",
        repository="kubernetes-sigs/lws",
        tag="v0.10.0",
        folder="config/crd/bases",
        sha256="c5dcad8ed943e495490241f00b9a1b45d51203b6d484020db3636d5bf553568e",
    ),
    _crd(
        file="keda.sh_scaledobjects.yaml",
        kind="ScaledObject",
        api_version="keda.sh/v1alpha1",
        repository="kedacore/keda",
        tag="v2.20.2",
        folder="config/crd/bases",
        sha256="af35555862a83933b074af14ad439c4b4ceabaf4daa3e9338e9b23e36d308d80",
    ),
    _crd(
        file="inference.networking.k8s.io_inferencepools.yaml",
        kind="InferencePool",
        api_version="inference.networking.k8s.io/v1",
        repository=_GIE,
        tag="v1.6.0",
        folder="config/crd/bases",
        sha256="55e0dbf39c50c4bbdd60106493a4573df4bb44479f9ce46762f1af718883e5cd",
    ),
    _crd(
        file="inference.networking.x-k8s.io_inferenceobjectives.yaml",
        kind="InferenceObjective",
        api_version="inference.networking.x-k8s.io/v1alpha2",
        repository=_GIE,
        tag="v1.5.0",
        folder="config/crd/bases",
        sha256="e06a3e13e91f7a3a71a9d4146fb56076a247f43ad72b6401f8039ccf9cfa3700",
    ),
    _crd(
        file="inference.networking.x-k8s.io_inferencemodels.yaml",
        kind="InferenceModel",
        api_version="inference.networking.x-k8s.io/v1alpha2",
        repository=_GIE,
        tag="v0.5.1",
        folder="config/crd/bases",
        sha256="30e7754cf559000817b00d03c6ff20bd3182202d0842d744d04b3639a4f54b10",
    ),
    _crd(
        file="gateway.networking.k8s.io_httproutes.yaml",
        kind="HTTPRoute",
        api_version="gateway.networking.k8s.io/v1",
        repository="kubernetes-sigs/gateway-api",
        tag="v1.6.1",
        folder="config/crd/standard",
        sha256="a424a0d6c953b162e71d1d97bb7e75012d8f1ac264e7274f2763d1b96ab39852",
    ),
    _crd(
        file="monitoring.coreos.com_podmonitors.yaml",
        kind="PodMonitor",
        api_version="monitoring.coreos.com/v1",
        repository=_PROM,
        tag="v0.93.0",
        folder=_PROM_DIR,
        sha256="45a93443daa687d3654f7e9631909ff7edcdf3ec09c5e60251b74aa2722aee5d",
    ),
    _crd(
        file="monitoring.coreos.com_servicemonitors.yaml",
        kind="ServiceMonitor",
        api_version="monitoring.coreos.com/v1",
        repository=_PROM,
        tag="v0.93.0",
        folder=_PROM_DIR,
        sha256="a99047972c9dd7679ce2050b9968e8a08773492e671b3e17abd476d42aa78a32",
    ),
    _crd(
        file="llm-d.ai_inferencemodelrewrites.yaml",
        kind="InferenceModelRewrite",
        api_version="llm-d.ai/v1alpha2",
        repository="llm-d/llm-d-router",
        tag="v0.10.0",
        folder="config/crd/bases",
        sha256="62a07fff40e10e919c245d895457a9c15be22947b45f06815552ae8fffaab405",
    ),
    _crd(
        file="llm-d.ai_inferenceobjectives.yaml",
        kind="InferenceObjective",
        api_version="llm-d.ai/v1alpha2",
        repository="llm-d/llm-d-router",
        tag="v0.10.0",
        folder="config/crd/bases",
        sha256="c1e763412fcbe2b55e9282850156269a10053be2d052547cb80a2ca639c09990",
    ),
)


def crd_cache_dir() -> Path:
    """Where ``lora-deploy crds`` puts the published CRDs, and where ``manifests`` and the tests look for them."""
    if os.environ.get(CRDS_ENV):
        return Path(os.environ[CRDS_ENV]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lora-deploy" / "crds"


def missing_crds(folder: Path) -> list[str]:
    """The files of :data:`PUBLISHED_CRDS` that ``folder`` lacks or holds with another sha256 (empty: all there)."""
    return [c.file for c in PUBLISHED_CRDS if _sha256_of(folder / c.file) != c.sha256]


def _sha256_of(path: Path) -> str | None:
    try:
        if path.is_symlink() or not path.is_file():
            return None
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


@dataclass(frozen=True, kw_only=True)
class CrdFetchReport:
    """What ``lora-deploy crds`` did: the folder, and each file fetched or found already there (sha256 checked)."""

    folder: str
    fetched: tuple[str, ...]
    present: tuple[str, ...]


def fetch_crds(folder: Path | None = None, *, source: str | None = None, timeout: float = 60.0) -> CrdFetchReport:
    """Download every published CRD into ``folder`` (default :func:`crd_cache_dir`), checking each sha256.

    ``source`` replaces the upstream URLs with one place that holds the files by name: a folder (an offline copy)
    or an ``http(s)://`` prefix (a mirror). A file whose sha256 differs from the table is refused and not kept:
    nothing but a verified file is ever written, each one through a temporary name and a rename.
    """
    folder = Path(folder) if folder is not None else crd_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(
            f"cannot create the CRD folder {folder}: {e.strerror or e}",
            hint=f"pass --dir DIR, or set {CRDS_ENV} to a writable folder",
        ) from e
    fetched, present = [], []
    for crd in PUBLISHED_CRDS:
        target = folder / crd.file
        if _sha256_of(target) == crd.sha256:
            present.append(crd.file)
            continue
        data = _read_source(crd, source, timeout)
        digest = hashlib.sha256(data).hexdigest()
        where = _where(crd, source)
        if digest != crd.sha256:
            raise InputError(
                f"{where}: sha256 {digest} is not the published {crd.kind} CRD's {crd.sha256} "
                f"({crd.repository} at {crd.tag})",
                hint="nothing was kept for this file; check the "
                "source (a proxy, a mirror or a changed release) and run `lora-deploy crds` again",
            )
        tmp = target.with_name(f".{crd.file}.part")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write {target}: {e.strerror or e}") from e
        fetched.append(crd.file)
    return CrdFetchReport(folder=str(folder), fetched=tuple(fetched), present=tuple(present))


def _where(crd: PublishedCrd, source: str | None) -> str:
    if source is None:
        return crd.url
    return f"{source.rstrip('/')}/{crd.file}"


def _read_source(crd: PublishedCrd, source: str | None, timeout: float) -> bytes:
    """One CRD file's bytes from upstream, a mirror URL or a local folder, bounded in size."""
    where = _where(crd, source)
    if source is not None and not source.startswith(("http://", "https://")):
        path = Path(source).expanduser() / crd.file
        if path.is_symlink() or not path.is_file():
            raise InputError(f"{path} is not a regular file", hint="--from takes a folder holding the CRD files")
        if path.stat().st_size > _MAX_CRD_BYTES:
            raise InputError(f"{path} is larger than any published CRD ({_MAX_CRD_BYTES >> 20} MiB)")
        return path.read_bytes()
    import requests

    try:
        with requests.get(where, timeout=timeout, stream=True, allow_redirects=True) as r:
            if r.status_code != 200:
                raise InputError(
                    f"{where}: HTTP {r.status_code}",
                    hint="check the network (or a proxy), or use --from FOLDER with files copied from the release",
                )
            data = bytearray()
            for chunk in r.iter_content(1 << 16):
                data += chunk
                if len(data) > _MAX_CRD_BYTES:
                    raise InputError(f"{where}: larger than any published CRD ({_MAX_CRD_BYTES >> 20} MiB)")
            return bytes(data)
    except requests.RequestException as e:
        raise InputError(
            f"could not download {where}: {type(e).__name__}",
            hint="check the network (or set HTTPS_PROXY), or use --from FOLDER with the files",
        ) from e
