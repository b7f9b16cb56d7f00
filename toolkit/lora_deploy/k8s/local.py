"""The deploy spec of a local run: what `dynamic --manifests` and `merged --manifests` write beside the manifests.

A local ``dynamic`` or ``merged --serve`` run already decided the served names, adapters and limits; these turn
that decision into a deploy spec (local folders become paths on the cluster volume) and write its manifests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_deploy.k8s.spec import DeploySpec, spec_for_local_run
from lora_deploy.serve.flags import default_served_name
from lora_deploy.serve.flows import DynamicDeployment
from lora_deploy.serve.settings import EngineSettings


@dataclass(frozen=True)
class WrittenDeployment:
    """Manifests written for a deployment: the folder, the deploy spec copy, and the spec itself."""

    folder: Path
    spec_file: Path
    spec: DeploySpec


def dynamic_spec(base: str, deployment: DynamicDeployment) -> DeploySpec:
    """The deploy spec for a dynamic deployment (local folders become paths on the cluster volume)."""
    cfg = deployment.config
    local = Path(base).exists()
    return spec_for_local_run(
        served_name=cfg.served_model_name,
        mode="dynamic",
        model=cfg.model if local else base,
        local_model=local,
        adapters=tuple((a.name, a.rank, a.moe_3d) for a in deployment.preflight.accepted),
        api_key=bool(cfg.api_key_env),
        runtime_adapters=cfg.allow_runtime_adapters,
        lora=cfg.lora,
        engine=cfg.engine,
    )


def merged_spec(
    checkpoint: str,
    *,
    served_model_name: str | None = None,
    api_key: bool = False,
    engine: EngineSettings = EngineSettings(),
) -> DeploySpec:
    """The deploy spec for serving a merged checkpoint (no LoRA at all)."""
    return spec_for_local_run(
        served_name=served_model_name or default_served_name(checkpoint),
        mode="merged",
        model=checkpoint,
        local_model=True,
        api_key=api_key,
        engine=engine,
    )


def write_deployment(spec: DeploySpec, folder: Path, *, force: bool = False) -> WrittenDeployment:
    """Validate and write the rendered manifests and a copy of the spec into ``folder`` (replaced only with force)."""
    from lora_deploy.k8s.render import SPEC_COPY, render_manifests, write_manifests
    from lora_deploy.k8s.spec import spec_to_yaml

    folder = Path(folder)
    write_manifests(render_manifests(spec), folder, force=force)
    (folder / SPEC_COPY).write_text(spec_to_yaml(spec))
    return WrittenDeployment(folder, folder / SPEC_COPY, spec)
