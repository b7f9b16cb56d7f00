"""Library flows behind `lora-deploy dynamic` and `merged --serve`, callable from Python.

The CLI parses and prints; these functions decide what a dynamic deployment serves (pre-flight, then a
:class:`~lora_deploy.serve.flags.ServeConfig`) and what a merged checkpoint is served as. The deploy spec and
manifests of either run are :mod:`lora_deploy.k8s.local`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_deploy.errors import InputError
from lora_deploy.hub import ResolvedRef
from lora_deploy.serve.flags import ServeConfig, default_served_name, model_name_problem
from lora_deploy.serve.preflight import PreflightReport
from lora_deploy.serve.settings import EngineSettings, LoraSettings


@dataclass(frozen=True)
class DynamicDeployment:
    """A dynamic deployment that passed pre-flight: what vLLM will be started with, and the verdicts."""

    config: ServeConfig
    preflight: PreflightReport
    warnings: tuple[str, ...] = ()  # what will not work as the user may expect (resolver adapters that never load)


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
            raise InputError(
                f"--adapter {v!r}: {problem}",
                hint="the same name is served locally and in the cluster; for example --adapter support-a=./adapters/a",
            )
        named[name] = path
    return named


def plan_dynamic(
    base: ResolvedRef,
    adapters: dict[str, str],
    *,
    served_model_name: str | None = None,
    check_port: bool = True,
    download: bool = True,
    adapter_store: str | None = None,
    lora: LoraSettings = LoraSettings(),
    **serve: Any,  # ServeConfig's own fields, checked by its constructor
) -> DynamicDeployment:
    """Pre-flight every adapter against ``base`` (resolved once where the user named it, to its configs and headers:
    :func:`lora_deploy.hub.resolve_headers`) and build the vLLM configuration that serves them.

    ``lora`` holds the LoRA limits the user set; ``serve`` the other :class:`ServeConfig` fields (host, port,
    engine, ...). With ``check_port`` a busy
    port is refused first (a moment, where vLLM finds out only after loading the model). Without ``download`` a hub
    base is read as configs and headers only and named by its id in the command, and nothing is written. With
    ``adapter_store`` every adapter published into that folder is served too (vLLM's filesystem resolver): the
    store is created for this server, or checked to be one this server can serve (exit 3 otherwise). Raises the
    pre-flight refusals (exit 3 for broken inputs, 4 for unsupported features) before anything starts.
    """
    import os

    from lora_deploy.serve.flags import resolver_env
    from lora_deploy.serve.preflight import check_adapters, require_passed, resolver_notes
    from lora_deploy.serve.store import describe_server, open_store

    if not adapters and not adapter_store and not serve.get("allow_runtime_adapters"):
        raise InputError(
            "nothing to serve with LoRA: no --adapter, no --adapter-store",
            hint="give --adapter NAME=PATH (repeat), or --adapter-store DIR --max-lora-rank R; to serve "
            "the base alone, run vLLM without LoRA (or lora-deploy merged for a merged model)",
        )
    if check_port:
        from lora_deploy.serve.launcher import check_port_free

        check_port_free(str(serve.get("host", "127.0.0.1")), int(serve.get("port", 8000)))
    store_record = None
    if adapter_store:
        store_record = open_store(adapter_store, create=False)
        if lora.max_lora_rank is None:
            if store_record is None:
                raise InputError(
                    f"--adapter-store {adapter_store} is a new store: say the largest rank its adapters may have",
                    hint="pass --max-lora-rank R (one of vLLM's values: 8, 16, 32, 64, ...)",
                )
            lora = lora.model_copy(update={"max_lora_rank": store_record.max_lora_rank})
    report = check_adapters(base, adapters, max_lora_rank=lora.max_lora_rank)
    require_passed(report)
    # a launch serves the weights (a hub base's are fetched into the cache once); a dry run only names them
    model = str(base.fetched().path) if download or not base.is_remote else base.source
    served = served_model_name or default_served_name(base.source)
    problem = model_name_problem(served, adapter=False)
    if problem:
        raise InputError(f"the base's served name: {problem}", hint="pass --served-model-name NAME")
    env = None
    if adapter_store:
        folder = str(Path(adapter_store).resolve())
        assert lora.max_lora_rank is not None  # set from the store above, or refused
        server = describe_server(base, model, served, lora.max_lora_rank, folder)
        open_store(folder, server, create=download)  # a dry run writes nothing: an existing store is still checked
        serve["adapter_store"] = folder
        env = {**os.environ, **resolver_env(folder)}
    cfg = ServeConfig(
        model=model, served_model_name=served, adapters=tuple(a.served() for a in report.accepted), lora=lora, **serve
    )
    return DynamicDeployment(cfg, report, tuple(resolver_notes(cfg.model, env)))


def merged_engine(merged_dtype: str, engine: EngineSettings, *, serve_dtype: str | None) -> EngineSettings:
    """The engine settings `merged --serve` (and its manifests) serve a checkpoint with: at the dtype it was written
    in unless ``serve_dtype`` says otherwise (vLLM's ``auto`` would downcast a float32 merge and make merged and
    dynamic answers differ)."""
    return engine.model_copy(update={"dtype": serve_dtype or merged_dtype})


def merged_serve_config(
    checkpoint: str,
    *,
    engine: EngineSettings,
    served_model_name: str | None = None,
    **serve: Any,  # ServeConfig's own fields, checked by its constructor
) -> ServeConfig:
    """How `merged --serve` serves a checkpoint (``engine`` from :func:`merged_engine`)."""
    return ServeConfig(
        model=checkpoint,
        served_model_name=served_model_name or default_served_name(checkpoint),
        engine=engine,
        **serve,
    )
