"""The launcher's process handling, with stand-in commands (the real vLLM runs in test_vllm_server.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lora_deploy.errors import LoraDeployError
from lora_deploy.serve.launcher import LaunchPlan, VllmServer, group_members

# a child that ignores SIGTERM and has a grandchild: only SIGKILL of the whole group ends both
STUBBORN = textwrap.dedent("""
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                      "time.sleep(300)"])
    time.sleep(300)
""")


def _plan(code: str, url: str = "http://127.0.0.1:9") -> LaunchPlan:
    return LaunchPlan(argv=[sys.executable, "-c", code], env={}, url=url, expected_models=["m"])


def _wait_gone(pgid: int, seconds: float = 30) -> list[int]:
    deadline = time.monotonic() + seconds
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return group_members(pgid)


def test_stop_kills_the_whole_group_after_the_grace_period(tmp_path):
    server = VllmServer(_plan(STUBBORN), log_path=tmp_path / "log")
    server.start()
    deadline = time.monotonic() + 10
    while len(group_members(server.pgid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(group_members(server.pgid)) == 2
    server.stop(grace=1.0)
    assert group_members(server.pgid) == []


def test_exit_during_start_up_is_reported_with_the_log_tail(tmp_path):
    code = "import sys; print('error: unrecognized arguments: --bogus', flush=True); sys.exit(2)"
    server = VllmServer(_plan(code), log_path=tmp_path / "log")
    server.start()
    with pytest.raises(LoraDeployError) as err:
        server.wait_ready(timeout=30)
    server.stop()
    assert err.value.exit_code == 7
    assert "exit code 2" in err.value.message and "--bogus" in err.value.message


def test_start_up_timeout_names_what_is_missing(tmp_path):
    with VllmServer(_plan("import time; time.sleep(60)"), log_path=tmp_path / "log") as server:
        with pytest.raises(LoraDeployError, match="not ready within 1 s.*missing: m"):
            server.wait_ready(timeout=1, poll=0.2)
    assert group_members(server.pgid) == []


def test_vllm_dies_with_a_killed_parent(tmp_path):
    """Even kill -9 of the process that started vLLM leaves nothing behind (PR_SET_PDEATHSIG)."""
    script = textwrap.dedent(f"""
        import json, sys, time
        from lora_deploy.serve.launcher import LaunchPlan, VllmServer
        plan = LaunchPlan(argv=[sys.executable, "-c", "import time; time.sleep(300)"], env={{}},
                          url="http://127.0.0.1:9", expected_models=["m"])
        server = VllmServer(plan, log_path={str(tmp_path / "log")!r})
        server.start()
        print(json.dumps({{"pgid": server.pgid}}), flush=True)
        time.sleep(300)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pgid = json.loads(parent.stdout.readline())["pgid"]
    assert group_members(pgid)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=10)
    assert _wait_gone(pgid) == []


def test_a_record_that_cannot_be_written_is_reported_not_swallowed(tmp_path, monkeypatch):
    """The launcher's record of startup adapters and runtime slots backs the `adapters` guards; when it cannot be
    written (XDG_RUNTIME_DIR is not a folder), serving goes on and the problem is reported, naming the fix."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(blocker))
    server = VllmServer(_plan("import time; time.sleep(60)"), log_path=tmp_path / "log")
    server.start()
    try:
        server._write_record()
        assert server.record_problem and str(blocker) in server.record_problem
        assert "XDG_RUNTIME_DIR" in server.record_problem and "startup adapters" in server.record_problem
    finally:
        server.stop(grace=1.0)
