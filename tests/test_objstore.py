"""Bases and adapters from an S3 API (``s3://BUCKET/PREFIX``), against a real S3 server on 127.0.0.1.

The server is moto's (``moto[server]``, as s3fs's own tests run it), started here on a free port and spoken to
over HTTP by boto3, the same client lora-deploy uses; the objects are uploaded through boto3 as a user's
pipeline would. Both directions: what is read from ``s3://`` equals the same read from a folder byte for byte,
and each failure (credentials, access, a missing bucket or prefix, a dead endpoint) is exit 3 naming the URL,
never the secret, and leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import assert_user_error, free_port, make_adapter, make_base, run_console

SECRET = "s3-test-secret-do-not-print"


def _start(port: int, **env: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **env},
    )
    import requests

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            return proc
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto's S3 server did not start")


def _env(port: int, **more: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "lora-deploy-test",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        **more,
    }


def _upload(s3, bucket: str, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder)}")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An S3 server holding a base and two adapters (one trained for another base), and the same files locally."""
    import boto3

    root = tmp_path_factory.mktemp("s3")
    base = make_base(root / "base", "llama")
    other = make_base(root / "other", "llama", hidden_size=48, intermediate_size=96)
    adapters = {
        "a": make_adapter(base, root / "a", seed=1, target_modules=["q_proj", "v_proj"]),
        "other": make_adapter(other, root / "other-adapter", seed=4, target_modules=["q_proj"]),
    }
    port = free_port()
    proc = _start(port)
    env = _env(port, LORA_DEPLOY_CACHE=str(root / "cache"))
    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket="models")
    _upload(s3, "models", base, "bases/llama")
    for name, folder in adapters.items():
        _upload(s3, "models", folder, f"adapters/{name}")
    try:
        yield {"env": env, "base": base, "adapters": adapters, "root": root, "port": port, "s3": s3}
    finally:
        proc.kill()
        proc.wait()


def _data_never_read(stub: Path) -> bool:
    """Whether a cached safetensors file holds its header and, after it, only the hole a headers-only read leaves
    (zeros, where the real tensors are not all zero)."""
    raw = stub.read_bytes()
    data = raw[8 + int.from_bytes(raw[:8], "little") :]
    return len(data) > 0 and not any(data)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_merge_from_s3_equals_the_merge_from_folders(store, tmp_path):
    """`merged --base s3://... --adapter s3://...` writes the very bytes the same merge from folders writes, and its
    provenance names the s3:// sources."""
    env = store["env"]
    local = run_console(
        "merged", "--base", str(store["base"]), "--adapter", str(store["adapters"]["a"]),
        "--output", str(tmp_path / "local"), "--json", env=env,
    )  # fmt: skip
    assert local.returncode == 0, local.stderr
    remote = run_console(
        "merged", "--base", "s3://models/bases/llama", "--adapter", "s3://models/adapters/a",
        "--output", str(tmp_path / "s3"), "--json", env=env,
    )  # fmt: skip
    assert remote.returncode == 0, remote.stderr
    ours, theirs = _files(tmp_path / "s3"), _files(tmp_path / "local")
    provenance = "lora_deploy_merge.json"
    assert {k: v for k, v in ours.items() if k != provenance} == {k: v for k, v in theirs.items() if k != provenance}
    record = json.loads(ours[provenance])
    assert record["base"]["source"] == "s3://models/bases/llama"
    assert record["adapters"][0]["source"] == "s3://models/adapters/a"
    assert record["base"]["revision"] and record["adapters"][0]["files"]  # the objects' digest and each file's hash
    assert SECRET not in remote.stdout + remote.stderr


def test_a_publish_from_s3_equals_the_publish_from_a_folder(store, tmp_path):
    """`adapters publish s3://...` stores the adapter's exact bytes and records the s3:// source; a second publish of
    the same URL downloads nothing (the cache is keyed by the objects' ETags)."""
    env = store["env"]
    create = ["--base", str(store["base"]), "--max-lora-rank", "16"]
    for name, source in (("from-folder", str(store["adapters"]["a"])), ("from-s3", "s3://models/adapters/a")):
        done = run_console("adapters", "publish", source, "--store", str(tmp_path / "st"), "--name", name, *create,
                           env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
    folder, remote = _files(tmp_path / "st" / "from-folder"), _files(tmp_path / "st" / "from-s3")
    assert {k: v for k, v in remote.items() if k.endswith(".safetensors") or k == "adapter_config.json"} == {
        k: v for k, v in folder.items() if k.endswith(".safetensors") or k == "adapter_config.json"
    }
    record = next(json.loads(v) for k, v in remote.items() if k.endswith("lora-deploy-publish.json"))
    assert record["source"] == "s3://models/adapters/a"
    assert (
        record["files"]["adapter_model.safetensors"] == hashlib.sha256(folder["adapter_model.safetensors"]).hexdigest()
    )


def test_a_second_read_downloads_nothing_and_a_check_reads_only_headers(store, monkeypatch):
    """The cache holds these very objects after one read: a second read makes no GET. A headers-only read (what
    pre-flight and plan do) leaves the weights a hole: two small ranged GETs per safetensors file."""
    from lora_deploy import objstore

    for k, v in store["env"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("LORA_DEPLOY_CACHE", str(store["root"] / "cache-counted"))
    gets: list[str] = []

    def counting():
        s3 = objstore.client()
        s3.meta.events.register(
            "before-parameter-build.s3.GetObject", lambda params, **_: gets.append(params.get("Range", ""))
        )
        return s3

    headers = objstore.fetch(
        "s3://models/adapters/a", patterns=["*.json", "*.safetensors"], headers_only=True, s3=counting()
    )
    weights = headers.path / "adapter_model.safetensors"
    assert _data_never_read(weights)
    assert [r for r in gets if r.startswith("bytes=0-7")] and all(
        r.startswith(("bytes=0-7", "bytes=8-", "bytes=0-")) for r in gets
    )
    gets.clear()
    objstore.fetch("s3://models/adapters/a", patterns=["*.json", "*.safetensors"], s3=counting())
    assert gets, "the first whole read downloads"
    gets.clear()
    again = objstore.fetch("s3://models/adapters/a", patterns=["*.json", "*.safetensors"], s3=counting())
    assert (
        gets == []
        and (again.path / "adapter_model.safetensors").read_bytes()
        == (store["adapters"]["a"] / "adapter_model.safetensors").read_bytes()
    )


def test_an_interrupted_download_resumes_where_it_stopped(store, monkeypatch):
    """A download cut off after a few ranges keeps them: the next read asks only for the rest, and the file is
    whole."""
    from lora_deploy import objstore

    for k, v in store["env"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("LORA_DEPLOY_CACHE", str(store["root"] / "cache-resume"))
    monkeypatch.setattr(objstore, "PART", 4096)
    monkeypatch.setattr(objstore, "WORKERS", 1)
    url, patterns = "s3://models/bases/llama", ["*.safetensors"]
    size = (store["base"] / "model.safetensors").stat().st_size
    parts = -(-size // 4096)
    gets: list[str] = []

    def client(fail_after: int | None):
        s3 = objstore.client()

        def count(params, **_):
            gets.append(params.get("Range", ""))
            if fail_after is not None and len(gets) > fail_after:
                raise ConnectionResetError("cut off")

        s3.meta.events.register("before-parameter-build.s3.GetObject", count)
        return s3

    with pytest.raises(ConnectionResetError):
        objstore.fetch(url, patterns=patterns, s3=client(fail_after=5))
    gets.clear()
    done = objstore.fetch(url, patterns=patterns, s3=client(fail_after=None))
    assert len(gets) == parts - 5, (len(gets), parts)
    assert (done.path / "model.safetensors").read_bytes() == (store["base"] / "model.safetensors").read_bytes()


def test_preflight_refuses_a_bad_adapter_from_s3_without_its_weights(store, tmp_path):
    """`check` of an adapter trained for another base refuses it (exit 3) having read only its headers."""
    env = {**store["env"], "LORA_DEPLOY_CACHE": str(tmp_path / "cache")}
    res = run_console("check", "--base", "s3://models/bases/llama", "--adapter", "x=s3://models/adapters/other",
                      env=env)  # fmt: skip
    assert res.returncode == 3, res.stderr
    stubs = list((tmp_path / "cache").rglob("adapter_model.safetensors"))
    assert stubs and all(_data_never_read(s) for s in stubs), stubs


@pytest.mark.parametrize(
    "case",
    ["missing bucket", "missing prefix", "dead endpoint", "no credentials"],
)
def test_each_failure_is_exit_3_naming_the_url_and_leaves_nothing(store, tmp_path, case):
    env = {**store["env"], "LORA_DEPLOY_CACHE": str(tmp_path / "cache")}
    url = "s3://models/adapters/a"
    if case == "missing bucket":
        url, needle = "s3://no-such-bucket/adapters/a", "NoSuchBucket"
    elif case == "missing prefix":
        url, needle = "s3://models/adapters/nothing-here", "no model or adapter files"
    elif case == "dead endpoint":
        env["AWS_ENDPOINT_URL"], needle = f"http://127.0.0.1:{free_port()}", "does not answer"
    else:
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env[k] = ""
        env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
        needle = "credentials"
    out = tmp_path / "merged"
    res = run_console("merged", "--base", str(store["base"]), "--adapter", url, "--output", str(out), env=env)
    assert_user_error(res, 3, url, needle)
    assert SECRET not in res.stderr + res.stdout
    assert not out.exists() and not list(tmp_path.glob("merged*"))
    published = run_console("adapters", "publish", url, "--store", str(tmp_path / "st"), "--name", "a",
                            "--base", str(store["base"]), "--max-lora-rank", "16", env=env)  # fmt: skip
    assert_user_error(published, 3, url)
    assert not (tmp_path / "st" / "a").exists()


def test_wrong_keys_and_a_key_without_access_are_refused(tmp_path):
    """An S3 server that checks credentials (moto with IAM auth on): an unknown key and a key whose user may not
    read the bucket each give exit 3 with the store's reason and a hint, never the secret."""
    import boto3

    port = free_port()
    # the first 4 requests run unauthenticated: the bucket, one object, a user and its key
    proc = _start(port, INITIAL_NO_AUTH_ACTION_COUNT="4")
    try:
        url = f"http://127.0.0.1:{port}"
        anon = {"endpoint_url": url, "region_name": "us-east-1", "aws_access_key_id": "x", "aws_secret_access_key": "y"}
        s3 = boto3.client("s3", **anon)
        s3.create_bucket(Bucket="locked")
        s3.put_object(Bucket="locked", Key="a/adapter_config.json", Body=b"{}")
        iam = boto3.client("iam", **anon)
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        env = {**_env(port), "LORA_DEPLOY_CACHE": str(tmp_path / "cache")}
        unknown = run_console("inspect", "s3://locked/a", env=env)
        assert_user_error(unknown, 3, "s3://locked/a", "InvalidAccessKeyId")
        env.update(AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])
        denied = run_console("inspect", "s3://locked/a", env=env)
        assert_user_error(denied, 3, "s3://locked/a", "AccessDenied")
        assert key["SecretAccessKey"] not in denied.stderr and SECRET not in unknown.stderr
    finally:
        proc.kill()
        proc.wait()


def test_objects_replaced_after_the_check_are_refused_not_mixed(store, monkeypatch, tmp_path):
    """What pre-flight read (the digest of every ETag) is what is downloaded: an adapter re-uploaded in between is
    refused with exit-3 advice, and a fresh resolution reads the new objects."""
    from lora_deploy.errors import InputError
    from lora_deploy.hub import resolve_headers

    for k, v in store["env"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("LORA_DEPLOY_CACHE", str(tmp_path / "cache"))
    s3 = store["s3"]
    _upload(s3, "models", store["adapters"]["a"], "adapters/changing")
    checked = resolve_headers("s3://models/adapters/changing", kind="adapter")
    s3.put_object(Bucket="models", Key="adapters/changing/adapter_config.json", Body=b'{"r": 8}')
    with pytest.raises(InputError, match="changed since they were checked") as err:
        checked.fetched(kind="adapter")
    assert err.value.exit_code == 3
    again = resolve_headers("s3://models/adapters/changing", kind="adapter")
    assert again.revision != checked.revision and (again.path / "adapter_config.json").read_bytes() == b'{"r": 8}'
