"""Printing around a vLLM launch, shared by `dynamic` and `merged --serve` (the launching is the library's)."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from lora_deploy.output import out


def launch(
    cfg,
    *,
    dry_run: bool,
    no_smoke: bool,
    exit_after_smoke: bool,
    timeout: float,
    log: Path | None,
    prompt: str | None,
    preflight=None,
) -> None:
    """Print the exact vLLM command (``dry_run``), or serve: report start-up, the smoke test, and exit with its code."""
    from lora_deploy.serve.flags import redact_env
    from lora_deploy.serve.launcher import ServeOptions, plan_launch, serve
    from lora_deploy.serve.smoke import format_report

    plan = plan_launch(cfg)
    for note in plan.notes:
        out.info(f"Note: {note}")
    if dry_run:
        command = " ".join(shlex.quote(a) for a in plan.argv)
        env_text = " ".join(f"{k}={shlex.quote(v)}" for k, v in redact_env(plan.env).items())
        data = {
            "argv": plan.argv,
            "env": redact_env(plan.env),
            "url": plan.url,
            "models": plan.expected_models,
            "vllm": plan.install,
            "notes": plan.notes,
        }
        if preflight is not None:
            data["preflight"] = preflight
        out.result(data, f"# {plan.install}\n{env_text} \\\n  {command}")
        return

    def started(server) -> None:
        out.info(f"Started {plan.install} (process group {server.pgid}); log: {server.log_path}")
        out.info(f"Waiting for {plan.url}/health and /v1/models to list: {', '.join(plan.expected_models)}")

    def ready(report) -> None:
        if report is None:
            out.result(
                {"url": plan.url, "models": plan.expected_models, "smoke": None},
                f"Ready: {plan.url} serves {', '.join(plan.expected_models)} (smoke test skipped)",
            )
        else:
            out.result({"url": plan.url, "models": plan.expected_models, "smoke": report}, format_report(report))
        if not exit_after_smoke and (report is None or report.passed):
            out.info(f"Serving at {plan.url}/v1 until Ctrl-C or SIGTERM.")

    code = serve(
        plan,
        ServeOptions(
            log_path=log, timeout=timeout, smoke=not no_smoke, exit_after_smoke=exit_after_smoke, prompt=prompt
        ),
        on_started=started,
        on_ready=ready,
        on_warning=out.warn,
    )
    if code:
        raise typer.Exit(code)


def report_written(written) -> None:
    """Tell where the manifests went and how to apply them."""
    spec = written.spec
    out.info(
        f"Wrote Kubernetes manifests to {written.folder} (spec: {written.spec_file}); the model is "
        f"expected at {spec.model} on the volume {spec.weights.claim or '(hub download)'}. "
        f"Apply: kubectl apply -k {written.folder}"
    )
