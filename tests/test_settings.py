"""The serving settings are declared once (serve/settings.py) and every surface derives from them.

These tests fail when a serving option is added to a command but not to the records (or the other way round), when
the deploy spec's ``vllm:`` section lacks a record field, or when a setting given on the command line or in a spec
does not reach vLLM's arguments. "A serving option" is judged by vLLM itself: a name that is a field of the installed
vLLM's ``EngineArgs``.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import typer

from helpers import run_cli, run_console
from k8s_cases import DYNAMIC, spec_files
from lora_deploy.cli import app
from lora_deploy.cli.merge_cmds import MERGED_ENGINE
from lora_deploy.cli.plan_cmd import PLAN_ENGINE
from lora_deploy.k8s.spec import DeploySpec, VllmSpec
from lora_deploy.serve.settings import EngineSettings, LoraSettings, cli_flag

RECORDS = (LoraSettings, EngineSettings)
FIELDS = {name: record for record in RECORDS for name in record.model_fields}
# options whose names vLLM also uses, and why they are not serving settings of the command that has them
NOT_SETTINGS = {
    ("dynamic", "served_model_name"): "the API name: a ServeConfig field, from the base's name by default",
    ("merged", "served_model_name"): "the API name of the merged checkpoint",
    ("merged", "dtype"): "the dtype the merge is written in (--serve-dtype is the served one)",
    ("merged", "revision"): "the hub revision of the base that is merged, not of what is served",
}
# each command and the record fields it takes (plan works out the tensor parallelism; merged serves in --serve-dtype)
TAKES = {
    "dynamic": set(FIELDS),
    "plan": set(LoraSettings.model_fields) | set(PLAN_ENGINE),
    "merged": set(MERGED_ENGINE),
    "check": {"max_lora_rank"},
}
# a value of each setting that differs from its default, as typed on the command line, and the flag vLLM gets
VALUES = {
    "max_lora_rank": "64",
    "max_loras": "3",
    "max_cpu_loras": "5",
    "dtype": "bfloat16",
    "max_model_len": "1024",
    "gpu_memory_utilization": "0.8",
    "tensor_parallel_size": "2",
    "kv_cache_dtype": "fp8",
}


def _options(command: str) -> dict:
    root = typer.main.get_command(app)
    return {p.name: p for p in root.commands[command].params if p.param_type_name == "option"}


def _engine_arg_names() -> set[str]:
    from vllm.engine.arg_utils import EngineArgs

    return {f.name for f in dataclasses.fields(EngineArgs)}


def test_every_record_field_is_a_vllm_engine_argument_and_a_spec_key():
    """Our names are vLLM's (the flag is the field's name), and the spec's vllm: section holds every field."""
    vllm_names = _engine_arg_names()
    assert set(FIELDS) <= vllm_names, set(FIELDS) - vllm_names
    assert set(FIELDS) <= set(VllmSpec.model_fields)
    assert set(VALUES) == set(FIELDS), "a new setting needs a value for the tests below"


@pytest.mark.parametrize("command", sorted(TAKES))
def test_each_command_takes_its_settings_from_the_records(command):
    """Every serving option of the command is a record field, with the record's flag and docstring as its help; and
    every field the command takes is one of its options."""
    options = _options(command)
    vllm_names = _engine_arg_names()
    stray = {
        name for name in options if name in vllm_names and name not in FIELDS and (command, name) not in NOT_SETTINGS
    }
    assert not stray, f"`{command}` has serving options outside serve/settings.py: {sorted(stray)}"
    from_records = {name for name in options if name in FIELDS and (command, name) not in NOT_SETTINGS}
    assert from_records == TAKES[command]
    for name in from_records:
        field = FIELDS[name].model_fields[name]
        assert options[name].help == " ".join((field.description or "").split()), name
        assert cli_flag(name) in options[name].opts, (name, options[name].opts)


def test_every_spec_key_is_documented():
    """Each key of the deploy spec carries the docstring the docs and errors can show."""

    def walk(model, where):
        for name, field in model.model_fields.items():
            assert field.description, f"{where}{field.alias or name} has no docstring"
            inner = field.annotation
            for candidate in (inner, *getattr(inner, "__args__", ())):
                if isinstance(candidate, type) and hasattr(candidate, "model_fields"):
                    walk(candidate, f"{where}{field.alias or name}.")

    walk(DeploySpec, "")


def test_each_setting_on_the_command_line_reaches_vllm(example):
    """`dynamic --dry-run` with every setting changed: each one is in the vLLM command with its value."""
    args = [f"{cli_flag(name)}={value}" for name, value in VALUES.items()]
    code, stdout, stderr = run_cli(
        "dynamic", "--base", str(example.base), "--adapter", f"classify={example.adapters['classify']}", "--dry-run",
        "--json", *args,
    )  # fmt: skip
    assert code == 0, stderr
    argv = json.loads(stdout)["argv"]
    for name, value in VALUES.items():
        flag = cli_flag(name)
        assert flag in argv and argv[argv.index(flag) + 1] == value, (flag, argv)


def test_each_setting_in_a_spec_reaches_the_manifests():
    """A spec's vllm: section with every setting changed: each one is in the servers' arguments with its value."""
    vllm = {DeploySpec.model_fields["vllm"].annotation.model_fields[n].alias: v for n, v in VALUES.items()}
    typed = {k: (v if k == "dtype" or k == "kvCacheDtype" else json.loads(v)) for k, v in vllm.items()}
    files = spec_files({**DYNAMIC, "gpus": 2, "vllm": typed})
    args = files["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]["args"]
    for name, value in VALUES.items():
        flag = cli_flag(name)
        assert flag in args and args[args.index(flag) + 1] == value, (flag, args)


def test_a_value_the_record_refuses_is_a_usage_mistake(example):
    """A setting of the wrong kind exits 3 naming its flag, through the installed console script."""
    done = run_console(
        "dynamic", "--base", str(example.base), "--adapter", f"classify={example.adapters['classify']}",
        "--dtype", "fp32", "--dry-run",
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "--dtype: 'fp32' is not 'auto'" in done.stderr and "Traceback" not in done.stderr


def test_the_spec_reference_in_docs_is_current():
    """docs/deploy-spec.md is what the records and their docstrings say today."""
    from pathlib import Path

    from lora_deploy.k8s.spec import spec_reference

    committed = (Path(__file__).parents[1] / "docs" / "deploy-spec.md").read_text()
    assert committed == spec_reference(), (
        'regenerate: .venv/bin/python -c "from lora_deploy.k8s.spec import spec_reference; '
        "print(spec_reference(), end='')\" > docs/deploy-spec.md"
    )
