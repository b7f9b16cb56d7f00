"""Download throughput from an S3 API, side by side with a local copy of the same files.

Starts moto's S3 server on 127.0.0.1 (what the tests run against), uploads a shard set of random bytes through
boto3, then times, in one run on one machine:

- ``local copy``: shutil.copyfile of each shard from a local folder (the page cache holds them: an upper bound);
- ``lora-deploy``: objstore.fetch into an empty cache (ranged GETs, 8 at once, resumable);
- ``boto3 download_file``: boto3's own TransferManager, one shard after another (its defaults).

and prints each one's MB/s and its ratio to the local copy. moto's server is one Python process on this machine,
so the absolute numbers say little about a real object store; the ratios between clients are what is compared.

    .venv/bin/python benchmarks/s3_bench.py --shards 2 --shard-mb 256
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--shard-mb", type=int, default=256)
    args = ap.parse_args()

    import boto3
    import requests

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            try:
                requests.get(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.2)
        env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_REGION": "us-east-1",
        }
        os.environ.update(env)
        root = Path(tempfile.mkdtemp(prefix="s3-bench-"))
        os.environ["LORA_DEPLOY_CACHE"] = str(root / "cache")
        local = root / "local"
        local.mkdir()
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="bench")
        (local / "config.json").write_text("{}")
        s3.upload_file(str(local / "config.json"), "bench", "model/config.json")
        for i in range(args.shards):
            shard = local / f"model-{i:05d}.safetensors"
            with open(shard, "wb") as f:
                for _ in range(args.shard_mb):
                    f.write(os.urandom(1 << 20))
            s3.upload_file(str(shard), "bench", f"model/{shard.name}")
        total = sum(p.stat().st_size for p in local.iterdir())

        def timed(label: str, fn) -> float:
            start = time.perf_counter()
            fn()
            seconds = time.perf_counter() - start
            print(f"{label:22s} {total / seconds / 1e6:8.1f} MB/s  ({seconds:.2f} s)")
            return seconds

        copies = root / "copies"
        copies.mkdir()
        base = timed("local copy", lambda: [shutil.copyfile(p, copies / p.name) for p in sorted(local.iterdir())])
        from lora_deploy import objstore

        ours = timed(
            "lora-deploy (fetch)",
            lambda: objstore.fetch("s3://bench/model", patterns=["*.json", "*.safetensors"]),
        )
        theirs_dir = root / "boto3"
        theirs_dir.mkdir()
        theirs = timed(
            "boto3 download_file",
            lambda: [
                s3.download_file("bench", f"model/{p.name}", str(theirs_dir / p.name)) for p in sorted(local.iterdir())
            ],
        )
        print(
            f"\n{total / 1e6:.0f} MB in {args.shards + 1} files; time relative to the local copy: "
            f"lora-deploy {ours / base:.1f}x, boto3 download_file {theirs / base:.1f}x; "
            f"lora-deploy vs boto3: {theirs / ours:.2f}x the speed"
        )
        shutil.rmtree(root, ignore_errors=True)
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
