"""Crash safety: a killed merge leaves litter that the next merge removes, and a full disk is a clear exit 5."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from helpers import run_cli
from lora_deploy.errors import EXIT_OUTPUT


def _partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def test_a_killed_merge_leaves_a_partial_that_the_next_merge_removes(llama_base, llama_adapter, tmp_path):
    out = tmp_path / "out"
    # a real merge process, killed with SIGKILL (no handler runs) after its first tensor reached the disk
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        import lora_deploy.model.shards as shards
        from lora_deploy.merge import MergeConfig, run_merge
        write = shards.ShardWriter.write
        def write_then_die(self, name, tensor):
            write(self, name, tensor)
            os.kill(os.getpid(), signal.SIGKILL)
        shards.ShardWriter.write = write_then_die
        run_merge(MergeConfig(base={str(llama_base)!r}, adapters=({str(llama_adapter)!r},), output=Path({str(out)!r})))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == -9, res.stderr
    left = _partials(out)
    assert len(left) == 1 and any(left[0].glob("*.safetensors")), "the kill should have left a partial folder"
    assert not out.exists()

    rc, stdout, stderr = run_cli(
        "merged", "--base", str(llama_base), "--adapter", str(llama_adapter), "--output", str(out), "--json"
    )
    assert rc == 0, stderr
    removed = json.loads(stdout)["merge"]["stale_partials_removed"]
    assert [r["path"] for r in removed] == [str(left[0])] and removed[0]["bytes"] > 0
    assert _partials(out) == [] and (out / "model.safetensors").is_file()


def _dead_pid() -> int:
    """A PID no process here has: what the PID of a writer in another pod (another PID namespace) looks like."""
    pid = 4_000_000
    while Path(f"/proc/{pid}").exists():
        pid += 1
    return pid


@pytest.mark.parametrize("where", ["this host", "another pod"])
def test_a_partial_of_a_write_still_running_is_left_alone(llama_base, llama_adapter, tmp_path, where):
    """Only partials whose writer is gone are removed: a live write into the same output keeps its folder, also when
    that writer runs in another pod (its owner file names a PID that means nothing here, as two publish Jobs are
    both PID 1), because liveness is the writer's lock on the owner file, not a PID. The other direction, a killed
    writer's partial removed, is the test above."""
    out = tmp_path / "out"
    owner = {"pid": _dead_pid(), "start": "1", "host": "publish-job-x7k2p"} if where == "another pod" else None
    code = textwrap.dedent(f"""
        import json, sys, time
        from pathlib import Path
        from lora_deploy._files import staged_folder
        with staged_folder(Path({str(out)!r}), force=False) as staged:
            (staged.path / "model.safetensors").write_bytes(b"x" * 100)
            if {owner!r}:
                (staged.path / ".lora-deploy-owner").write_text(json.dumps({owner!r}))
            print(staged.path, flush=True)
            time.sleep(120)
        """)
    live = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        busy = Path(live.stdout.readline().strip())
        assert busy.is_dir() and busy.name.startswith(".out.partial-"), busy
        rc, stdout, stderr = run_cli(
            "merged", "--base", str(llama_base), "--adapter", str(llama_adapter), "--output", str(out), "--json"
        )
        assert rc == 0, stderr
        assert json.loads(stdout)["merge"]["stale_partials_removed"] == []
        assert busy.is_dir() and (busy / "model.safetensors").is_file()
    finally:
        live.kill()
        live.wait()


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (needs mount rights: root in a container that allows it; skipped elsewhere)."""
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_not_enough_space_is_refused_before_writing(llama_base, llama_adapter, small_disk):
    """The example merge needs ~2.5 MB (fp16 of a 1.2M-parameter model); with 1 MB free it is refused up front."""
    (small_disk / "filler").write_bytes(b"\0" * (2 << 20))
    out = small_disk / "out"
    rc, _, stderr = run_cli(
        "merged", "--base", str(llama_base), "--adapter", str(llama_adapter), "--output", str(out), "--dtype", "float32"
    )
    assert rc == EXIT_OUTPUT, stderr
    assert "not enough free space" in stderr and "needs" in stderr and "free" in stderr
    assert not out.exists() and _partials(out) == []


def test_a_disk_that_fills_during_the_write_is_exit_5_and_leaves_nothing(
    llama_base, llama_adapter, small_disk, monkeypatch
):
    """Space taken by someone else after the check: ENOSPC mid-write is a clear error, the partial is removed."""
    import lora_deploy._files as files

    monkeypatch.setattr(files, "check_free_space", lambda *a, **k: None)  # as if the space vanished after it
    (small_disk / "filler").write_bytes(b"\0" * (2 << 20))
    out = small_disk / "out"
    rc, _, stderr = run_cli(
        "merged", "--base", str(llama_base), "--adapter", str(llama_adapter), "--output", str(out), "--dtype", "float32"
    )
    assert rc == EXIT_OUTPUT, stderr
    assert "disk filled up" in stderr
    assert not out.exists() and _partials(out) == []
    os.unlink(small_disk / "filler")
    assert shutil.disk_usage(small_disk).used < (64 << 10), "the partial folder's bytes were not freed"
