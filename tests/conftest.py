"""pytest's own hooks and the session fixtures (a tiny Llama and its adapter, the tiny and the real example);
what tests import by name lives in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import CRD_SKIP, make_adapter, make_base, quiet_transformers


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Every CRD skip carries one location, so the summary prints its reason once (not once per calling line)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(report.longrepr, tuple) and CRD_SKIP in str(report.longrepr[2]):
        report.longrepr = (str(Path(__file__).with_name("helpers.py")), 0, report.longrepr[2])


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("llama") / "base", "llama", tokenizer=True)


@pytest.fixture(scope="session")
def llama_adapter(llama_base, tmp_path_factory) -> Path:
    return make_adapter(
        llama_base, tmp_path_factory.mktemp("llama-adapter") / "a", target_modules=["q_proj", "v_proj", "down_proj"]
    )


@pytest.fixture(scope="session")
def example(tmp_path_factory):
    from lora_deploy.examples.tiny import build_example

    quiet_transformers()
    return build_example(tmp_path_factory.mktemp("example"))


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    """The real example: SmolLM2-135M-Instruct (bf16) and its classify/reply adapters, from the user cache."""
    from lora_deploy.examples.smollm2 import build_real_example

    return build_real_example(tmp_path_factory.mktemp("smollm2") / "example")
