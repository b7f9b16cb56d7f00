"""Library flows behind `lora-deploy dynamic` and `merged --serve/--manifests`, callable from Python.

The CLI parses and prints; these functions decide: what a dynamic deployment serves (pre-flight, then a
:class:`~lora_deploy.serving.ServeConfig`), what a merged checkpoint is served as, and which deploy spec and
manifests describe either for Kubernetes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .preflight import PreflightReport
from .serving import ServeConfig, default_served_name, model_name_problem
from .spec import DeploySpec


@dataclass(frozen=True)
class DynamicDeployment:
    """A dynamic deployment that passed pre-flight: what vLLM will be started with, and the verdicts."""

    config: ServeConfig
    preflight: PreflightReport
    warnings: tuple[str, ...] = ()  # what will not work as the user may expect (resolver adapters that never load)


@dataclass(frozen=True)
class WrittenDeployment:
    """Manifests written for a deployment: the folder, the deploy spec copy, and the spec itself."""

    folder: Path
    spec_file: Path
    spec: DeploySpec


def parse_named_adapters(values: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``NAME=PATH`` pairs (as ``--adapter`` takes them) into an ordered mapping; names must be unique."""
    named: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--adapter {v!r} is not NAME=PATH", hint="for example --adapter classify=./adapters/c")
        if name in named:
            raise InputError(f"adapter name {name!r} is given twice")
        problem = model_name_problem(name, adapter=True)
        if problem:
            raise InputError(f"--adapter {v!r}: {problem}", hint="the same name is served locally and in the "
                             "cluster; for example --adapter support-a=./adapters/a")
        named[name] = path
    return named


def plan_dynamic(base: str, adapters: dict[str, str], *, served_model_name: str | None = None,
                 check_port: bool = True, download: bool = True, **serve: object) -> DynamicDeployment:
    """Pre-flight every adapter against ``base`` and build the vLLM configuration that serves them.

    ``serve`` holds :class:`ServeConfig` fields (host, port, dtype, max_loras, ...). With ``check_port`` a busy
    port is refused first (a moment, where vLLM finds out only after loading the model). Without ``download`` a hub
    base is read as configs and headers only and named by its id in the command. Raises the pre-flight
    refusals (exit 3 for broken inputs, 4 for unsupported features) before anything starts.
    """
    from .hub import resolve_ref
    from .preflight import check_adapters, require_passed, resolver_notes

    if check_port:
        from .launcher import check_port_free

        check_port_free(str(serve.get("host", "127.0.0.1")), int(serve.get("port", 8000)))
    report = check_adapters(base, adapters, max_lora_rank=serve.get("max_lora_rank"))
    require_passed(report)
    # a launch serves the weights (a hub base is fetched into the cache once); a dry run only names them
    model = str(resolve_ref(base, kind="base model").path) if download or Path(base).exists() else base
    served = served_model_name or default_served_name(base)
    problem = model_name_problem(served, adapter=False)
    if problem:
        raise InputError(f"the base's served name: {problem}", hint="pass --served-model-name NAME")
    cfg = ServeConfig(model=model, served_model_name=served,
                      adapters=tuple(a.served() for a in report.accepted), **serve)
    return DynamicDeployment(cfg, report, tuple(resolver_notes(cfg.model)))


def dynamic_spec(base: str, deployment: DynamicDeployment) -> DeploySpec:
    """The deploy spec for a dynamic deployment (local folders become paths on the cluster volume)."""
    from .spec import spec_for_local_run

    cfg = deployment.config
    local = Path(base).exists()
    return spec_for_local_run(served_name=cfg.served_model_name, mode="dynamic", model=cfg.model if local else base,
                              local_model=local, adapters=tuple((a.name, a.rank, a.moe_3d) for a in deployment.preflight.accepted),
                              api_key=bool(cfg.api_key_env), runtime_adapters=cfg.allow_runtime_adapters,
                              max_model_len=cfg.max_model_len)


def merged_spec(checkpoint: str, *, served_model_name: str | None = None, api_key: bool = False,
                max_model_len: int | None = None) -> DeploySpec:
    """The deploy spec for serving a merged checkpoint (no LoRA at all)."""
    from .spec import spec_for_local_run

    return spec_for_local_run(served_name=served_model_name or default_served_name(checkpoint), mode="merged", model=checkpoint,
                              local_model=True, api_key=api_key, max_model_len=max_model_len)


def merged_serve_config(checkpoint: str, merged_dtype: str, *, serve_dtype: str | None = None,
                        served_model_name: str | None = None, **serve: object) -> ServeConfig:
    """How `merged --serve` serves a checkpoint: at the dtype it was written in unless ``serve_dtype`` says
    otherwise (vLLM's ``auto`` would downcast a float32 merge and make merged and dynamic answers differ)."""
    return ServeConfig(model=checkpoint, served_model_name=served_model_name or default_served_name(checkpoint),
                       dtype=serve_dtype or merged_dtype, **serve)


def write_deployment(spec: DeploySpec, folder: Path, *, force: bool = False) -> WrittenDeployment:
    """Validate and write the rendered manifests and a copy of the spec into ``folder`` (replaced only with force)."""
    from .k8s import SPEC_COPY, render_manifests, write_manifests
    from .spec import spec_to_yaml

    folder = Path(folder)
    write_manifests(render_manifests(spec), folder, force=force)
    (folder / SPEC_COPY).write_text(spec_to_yaml(spec))
    return WrittenDeployment(folder, folder / SPEC_COPY, spec)
