"""Merge benchmark: plain copy vs `lora-deploy merged` vs PEFT load + merge_and_unload + save_pretrained.

Builds a synthetic Llama-shaped fp16 checkpoint (TinyLlama-1.1B shapes by default: 1.1B parameters,
sharded like a hub model) and a rank-16 adapter on every linear layer, then runs the three jobs side
by side, each as the whole process a user runs (``cp -r``, the ``lora-deploy merged`` command, a Python
process running PEFT), interpreter start and imports included, and prints wall time and peak memory
(max RSS) with ratios. Runs are interleaved and the median is kept.

    .venv/bin/python benchmarks/merge_bench.py --workdir /tmp/lora-bench            # 1.1B
    .venv/bin/python benchmarks/merge_bench.py --workdir /tmp/lora-bench-s --layers 8   # 0.49B

Nothing here is a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(workdir: Path, layers: int, rank: int) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    base, adapter = workdir / "base", workdir / "adapter"
    if (base / "config.json").is_file() and (adapter / "adapter_config.json").is_file():
        return base, adapter
    shutil.rmtree(workdir, ignore_errors=True)
    base.mkdir(parents=True)
    adapter.mkdir()
    cfg = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        tie_word_embeddings=False,
        dtype="float16",
    )
    cfg.save_pretrained(base)
    h, i, kv = 2048, 5632, 4 * 64
    shapes = {"model.embed_tokens.weight": (32000, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (32000, h)})
    gen = torch.Generator().manual_seed(0)
    shard, shard_bytes, files, weight_map = {}, 0, [], {}
    limit = 1 << 30  # ~1 GiB shards, like hub checkpoints

    def flush():
        nonlocal shard, shard_bytes
        name = f"shard-{len(files):05d}.safetensors"
        save_file(shard, base / name, metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, shard_bytes = {}, 0

    for name, shape in shapes.items():
        t = (
            (torch.randn(shape, generator=gen) * 0.02).to(torch.float16)
            if len(shape) == 2
            else torch.ones(shape, dtype=torch.float16)
        )
        if shard and shard_bytes + t.numel() * 2 > limit:
            flush()
        shard[name] = t
        shard_bytes += t.numel() * 2
    flush()
    n = len(files)
    final = {}
    for k, f in enumerate(files):
        new = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        (base / f).rename(base / new)
        final[f] = new
    weight_map = {k: final[v] for k, v in weight_map.items()}
    total = sum((base / f).stat().st_size for f in final.values())
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    lora = {}
    for name, shape in shapes.items():
        if any(t in name for t in TARGETS):
            mod = "base_model.model." + name[: -len(".weight")]
            lora[mod + ".lora_A.weight"] = torch.randn(rank, shape[1], generator=gen) * 0.01
            lora[mod + ".lora_B.weight"] = torch.randn(shape[0], rank, generator=gen) * 0.01
    save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": 2 * rank,
                "target_modules": TARGETS,
                "base_model_name_or_path": str(base),
                "bias": "none",
                "fan_in_fan_out": False,
                "lora_dropout": 0.0,
                "init_lora_weights": True,
                "use_rslora": False,
                "use_dora": False,
            }
        )
    )
    return base, adapter


def job_command(mode: str, base: Path, adapter: Path, out: Path) -> list[str]:
    """The whole process each job is: what a user runs, interpreter start and imports included."""
    if mode == "copy":
        return ["cp", "-r", str(base), str(out)]
    if mode == "lora-deploy":
        cli = Path(sys.executable).with_name("lora-deploy")
        return [
            str(cli),
            "merged",
            "--base",
            str(base),
            "--adapter",
            str(adapter),
            "--output",
            str(out),
            "--dtype",
            "float16",
            "--shard-size",
            "1GB",
        ]
    script = (
        "import sys, torch\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\n"
        "base, adapter, out = sys.argv[1:]\n"
        "model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)\n"
        "model = PeftModel.from_pretrained(model, adapter).merge_and_unload()\n"
        "model.save_pretrained(out, max_shard_size='1GB')\n"
    )
    return [sys.executable, "-c", script, str(base), str(adapter), str(out)]


def timed(cmd: list[str]) -> dict:
    """Wall seconds and peak RSS of one whole child process (wait4's rusage: that child alone)."""
    with tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{cmd[0]} failed:\n{err.read().decode()[-2000:]}")
    return {"seconds": seconds, "max_rss": usage.ru_maxrss * 1024}


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        raise SystemExit(f"--cold needs permission to write /proc/sys/vm/drop_caches ({e})") from e


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lora-deploy-bench"))
    ap.add_argument("--layers", type=int, default=22, help="decoder layers (22: 1.1B parameters; 8: 0.49B)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each job, interleaved; the median is kept")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument(
        "--cold", action="store_true", help="drop the OS page cache before each job (needs root): reads come from disk"
    )
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.build_only:
        build(args.workdir, args.layers, args.rank)
        return
    # build in a child: a parent holding torch's memory would be counted in every forked job's peak RSS
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--build-only",
            "--workdir",
            str(args.workdir),
            "--layers",
            str(args.layers),
            "--rank",
            str(args.rank),
        ],
        check=True,
    )
    base, adapter = args.workdir / "base", args.workdir / "adapter"
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    params = size // 2
    print(f"page cache: {'dropped before each job (cold reads)' if args.cold else 'warm (inputs in memory)'}")
    print(
        f"checkpoint: {params / 1e9:.2f}B parameters, {size / 1e9:.2f} GB fp16, "
        f"{len(list(base.glob('*.safetensors')))} shard(s); adapter rank {args.rank} on {len(TARGETS)} "
        "modules/layer"
    )
    modes = ["copy", "lora-deploy"] + ([] if args.skip_peft else ["peft"])
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.repeat):
        for mode in modes:  # interleaved, so a slow spell of a shared machine hits every job alike
            out = args.workdir / f"out-{mode}"
            shutil.rmtree(out, ignore_errors=True)
            if args.cold:
                drop_caches()
            runs[mode].append(timed(job_command(mode, base, adapter, out)))
            shutil.rmtree(out, ignore_errors=True)
    results = {m: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "max_rss")} for m, rs in runs.items()}
    copy = results["copy"]
    print(f"whole processes (interpreter start and imports included), median of {args.repeat}")
    print(f"{'job':<14}{'wall s':>8}{'peak RSS':>11}{'/copy':>8}{'RSS/peft':>10}")
    for mode, r in results.items():
        rss_ratio = r["max_rss"] / results["peft"]["max_rss"] if "peft" in results else float("nan")
        print(
            f"{mode:<14}{r['seconds']:>8.2f}{r['max_rss'] / 1e9:>9.2f}GB"
            f"{r['seconds'] / copy['seconds']:>7.2f}x{rss_ratio:>9.2f}x"
        )
    ld = results["lora-deploy"]
    line = f"lora-deploy: {ld['seconds'] / copy['seconds']:.2f}x the copy's time"
    if "peft" in results:
        pf = results["peft"]
        line += (
            f"; {pf['seconds'] / ld['seconds']:.1f}x faster than PEFT, "
            f"{ld['max_rss'] / pf['max_rss']:.2f}x its peak memory"
        )
    print(line)


if __name__ == "__main__":
    main()
