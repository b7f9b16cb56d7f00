"""Bad input: a clear message naming the file and problem, a meaningful exit code, no traceback, no output."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess

import pytest
import torch

from helpers import edit_json, make_adapter, make_base, run_cli, run_console
from lora_deploy.errors import EXIT_INPUT, EXIT_OUTPUT, EXIT_UNSUPPORTED, EXIT_USAGE


@pytest.fixture
def adapter_copy(llama_adapter, tmp_path):
    dst = tmp_path / "adapter"
    shutil.copytree(llama_adapter, dst)
    return dst


def _merged(base, adapter, out, *extra):
    return run_cli("merged", "--base", str(base), "--adapter", str(adapter), "--output", str(out), *extra)


def _assert_refused(result, code, *needles, out=None):
    rc, stdout, stderr = result
    assert rc == code, (rc, stdout, stderr)
    assert "\nError: " in "\n" + stderr
    for n in needles:
        assert n in stderr, (n, stderr)
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.partial-*")), "a partial folder was left behind"


def test_missing_adapter_config(llama_base, adapter_copy, tmp_path):
    (adapter_copy / "adapter_config.json").unlink()
    out = tmp_path / "out"
    _assert_refused(_merged(llama_base, adapter_copy, out), EXIT_INPUT, "adapter_config.json is missing", out=out)


def test_malformed_adapter_config(llama_base, adapter_copy, tmp_path):
    (adapter_copy / "adapter_config.json").write_text("{not json")
    out = tmp_path / "out"
    _assert_refused(
        _merged(llama_base, adapter_copy, out), EXIT_INPUT, "adapter_config.json is not valid JSON", out=out
    )


def test_config_without_rank(llama_base, adapter_copy, tmp_path):
    cfg = json.loads((adapter_copy / "adapter_config.json").read_text())
    del cfg["r"]
    (adapter_copy / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    _assert_refused(_merged(llama_base, adapter_copy, out), EXIT_UNSUPPORTED, "lacks r", out=out)


def test_missing_weights(llama_base, adapter_copy, tmp_path):
    (adapter_copy / "adapter_model.safetensors").unlink()
    out = tmp_path / "out"
    _assert_refused(_merged(llama_base, adapter_copy, out), EXIT_INPUT, "no adapter_model.safetensors", out=out)


def test_truncated_weights(llama_base, adapter_copy, tmp_path):
    f = adapter_copy / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    out = tmp_path / "out"
    _assert_refused(
        _merged(llama_base, adapter_copy, out), EXIT_INPUT, "truncated", "adapter_model.safetensors", out=out
    )


def test_corrupt_header(llama_base, adapter_copy, tmp_path):
    f = adapter_copy / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + n] = b"x" * n
    f.write_bytes(bytes(data))
    out = tmp_path / "out"
    _assert_refused(_merged(llama_base, adapter_copy, out), EXIT_INPUT, "corrupt safetensors header", out=out)


def test_adapter_for_another_base_shape(llama_base, tmp_path):
    other = make_base(
        tmp_path / "other",
        "llama",
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=256,
    )
    adapter = make_adapter(other, tmp_path / "adapter", target_modules=["q_proj"])
    out = tmp_path / "out"
    _assert_refused(
        _merged(llama_base, adapter, out), EXIT_INPUT, "another base model", "model.layers.0.self_attn.q_proj", out=out
    )


def test_adapter_module_not_in_base(llama_base, tmp_path):
    deeper = make_base(tmp_path / "deeper", "llama", num_hidden_layers=3)
    adapter = make_adapter(deeper, tmp_path / "adapter", target_modules=["q_proj"])
    out = tmp_path / "out"
    _assert_refused(
        _merged(llama_base, adapter, out),
        EXIT_INPUT,
        "model.layers.2.self_attn.q_proj.weight",
        "does not have",
        out=out,
    )


def test_unsupported_peft_type(llama_base, tmp_path):
    from peft import IA3Config, get_peft_model

    from helpers import load_base

    get_peft_model(
        load_base(llama_base), IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
    ).save_pretrained(tmp_path / "ia3")
    out = tmp_path / "out"
    _assert_refused(_merged(llama_base, tmp_path / "ia3", out), EXIT_UNSUPPORTED, "peft_type is 'IA3'", out=out)


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("init_lora_weights", "pissa", "init_lora_weights='pissa'"),
        ("layer_replication", [[0, 2], [1, 2]], "layer_replication"),
        ("alora_invocation_tokens", [5, 6], "aLoRA"),
    ],
)
def test_unmergeable_features_are_named(llama_base, adapter_copy, tmp_path, field, value, needle):
    edit_json(adapter_copy / "adapter_config.json", **{field: value})
    out = tmp_path / "out"
    _assert_refused(_merged(llama_base, adapter_copy, out), EXIT_UNSUPPORTED, needle, out=out)
    rc, stdout, _ = run_cli("inspect", str(adapter_copy), "--json")
    assert rc == EXIT_UNSUPPORTED and json.loads(stdout)["mergeable"] is False


def test_non_finite_adapter(llama_base, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = make_adapter(llama_base, tmp_path / "adapter", target_modules=["q_proj"])
    f = adapter / "adapter_model.safetensors"
    state = load_file(f)
    key = next(k for k in state if "lora_B" in k)
    state[key][0, 0] = float("nan")
    save_file(state, f, metadata={"format": "pt"})
    out = tmp_path / "out"
    _assert_refused(_merged(llama_base, adapter, out), EXIT_INPUT, "NaN or Inf", key, out=out)


def test_pickle_adapter_refused_unless_allowed(llama_base, tmp_path):
    adapter = make_adapter(
        llama_base, tmp_path / "adapter", target_modules=["q_proj"], save_kwargs={"safe_serialization": False}
    )
    assert (adapter / "adapter_model.bin").is_file()
    out = tmp_path / "out"
    _assert_refused(_merged(llama_base, adapter, out), EXIT_INPUT, "pickle", "--allow-pickle", out=out)
    rc, _, stderr = _merged(llama_base, adapter, out, "--allow-pickle", "--dtype", "float32")
    assert rc == 0, stderr
    assert (out / "model.safetensors").is_file()


def test_base_that_does_not_exist(llama_adapter, tmp_path):
    out = tmp_path / "out"
    _assert_refused(_merged(tmp_path / "nope", llama_adapter, out), EXIT_INPUT, "does not exist", out=out)


def test_unknown_dtype(llama_base, llama_adapter, tmp_path):
    out = tmp_path / "out"
    _assert_refused(
        _merged(llama_base, llama_adapter, out, "--dtype", "float8"), EXIT_INPUT, "unknown dtype 'float8'", out=out
    )


@pytest.mark.parametrize("weights", ["0.5,0.5", "abc"])
def test_weights_that_do_not_match(llama_base, llama_adapter, tmp_path, weights):
    out = tmp_path / "out"
    _assert_refused(_merged(llama_base, llama_adapter, out, "--weights", weights), EXIT_INPUT, "--weights", out=out)


def test_existing_output_needs_force(llama_base, llama_adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc, _, stderr = _merged(llama_base, llama_adapter, out)
    assert rc == EXIT_OUTPUT and "already exists" in stderr and "--force" in stderr
    assert (out / "keep.txt").read_text() == "precious"
    rc, _, stderr = _merged(llama_base, llama_adapter, out, "--force")
    assert rc == 0, stderr
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_fp16_overflow_is_refused_and_leaves_nothing(tmp_path):
    base = make_base(tmp_path / "base", "llama")
    from safetensors.torch import load_file, save_file

    f = base / "model.safetensors"
    state = load_file(f)
    state["model.layers.1.mlp.down_proj.weight"][0, 0] = 1e6
    save_file(state, f, metadata={"format": "pt"})
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    out = tmp_path / "out"
    _assert_refused(
        _merged(base, adapter, out),
        3,
        "model.layers.1.mlp.down_proj.weight",
        "beyond float16's range",
        "bfloat16",
        out=out,
    )
    rc, _, stderr = _merged(base, adapter, out, "--dtype", "bfloat16")
    assert rc == 0, stderr


def test_missing_base_config(llama_adapter, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    torch.save({}, base / "junk.pt")
    out = tmp_path / "out"
    _assert_refused(_merged(base, llama_adapter, out), EXIT_INPUT, "config.json is missing", out=out)


def _process(*args: str) -> subprocess.CompletedProcess:
    """The real `lora-deploy` process (console entry point, quick exit included), as users and CI run it."""
    return run_console(*args)


@pytest.mark.parametrize(
    "args,needle",
    [
        (("plan-nothing",), "No such command"),
        (("merged", "--bogus"), "No such option: --bogus"),
        (
            ("merged", "--base", "b", "--adapter", "a", "--output", "o", "--verify", "maybe"),
            "Got unexpected extra argument",
        ),
    ],
)
def test_a_bad_command_line_exits_2_with_usage_and_no_traceback(args, needle):
    res = _process(*args)
    assert res.returncode == EXIT_USAGE, res
    assert needle in res.stderr and "Usage:" in res.stderr and "Traceback" not in res.stderr


def test_the_process_exits_quickly_without_losing_output(llama_base, llama_adapter, tmp_path):
    """After a merge the process skips torch's teardown: its --json report and files must still be complete."""
    res = _process(
        "merged",
        "--base",
        str(llama_base),
        "--adapter",
        str(llama_adapter),
        "--output",
        str(tmp_path / "out"),
        "--json",
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)["merge"]
    assert report["tensors_changed"] > 0 and (tmp_path / "out" / report["provenance"]).is_file()
    res = _process(
        "merged",
        "--base",
        str(llama_base),
        "--adapter",
        str(llama_adapter),
        "--output",
        str(tmp_path / "out"),
        "--json",
    )
    assert res.returncode == EXIT_OUTPUT and "--force" in res.stderr


def test_an_unrecognised_real_model_source_is_refused_not_replaced(tmp_path):
    """A typo in --model-source must not silently fall back to the PyPI wheel."""
    rc, _, stderr = run_cli("example", str(tmp_path / "ex"), "--model-source", str(tmp_path / "SmolLM2-typo"))
    assert rc == 3 and "not a .gguf file, a model folder" in stderr
    assert not (tmp_path / "ex").exists()
