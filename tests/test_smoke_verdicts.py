"""The smoke test's verdict rules on answers with known distributions: both directions of every rule.

These are the pure judging functions (what a burst answer is attributed to, which text differences are
near-ties); tests/test_vllm_server.py runs the same code against real vLLM.
"""

from __future__ import annotations

from lora_deploy.serve.smoke import NEAR_TIE_NATS, Probe, _applied_check, _burst_check

BASE = Probe(" Thank you", (" Thank", " you"), ({" Thank": -0.1, " Please": -2.5}, {" you": -0.01, " u": -5.0}))
ADAPTER = Probe(" account", (" account",), ({" account": -0.01, " Thank": -6.0},))
# an adapter that shares the base's greedy text but moves its distribution
FAINT = Probe(" Thank you", (" Thank", " you"), ({" Thank": -0.12, " Please": -2.4}, {" you": -0.02, " u": -4.9}))
REFS = {"base": BASE, "classify": ADAPTER, "faint": FAINT}


def test_an_applied_adapter_with_the_base_text_passes_and_an_identical_one_fails():
    assert _applied_check("faint", FAINT, BASE, 1e-3, True).passed
    assert not _applied_check("zero", BASE, BASE, 1e-3, True).passed
    assert _applied_check("classify", ADAPTER, BASE, 1e-3, True).passed


def test_a_base_request_answered_with_adapter_weights_is_caught():
    check = _burst_check("base", BASE, [BASE, ADAPTER], refs=REFS, threshold=1e-3, use_distributions=True)
    assert not check.passed and "closer to 'classify'" in check.detail


def test_swapped_adapters_are_caught_even_when_an_adapter_matches_the_base_text():
    assert not _burst_check("classify", ADAPTER, [FAINT], refs=REFS, threshold=1e-3, use_distributions=True).passed
    assert not _burst_check(
        "faint", FAINT, [BASE], refs=REFS, threshold=1e-3, use_distributions=True
    ).passed  # base weights, same text
    assert _burst_check("faint", FAINT, [FAINT, FAINT], refs=REFS, threshold=1e-3, use_distributions=True).passed


def test_a_text_flip_is_accepted_only_at_a_near_tie():
    tie = Probe(" A B", (" A", " B"), ({" A": -0.70, " C": -0.70 - NEAR_TIE_NATS / 2}, {" B": -0.1, " D": -3.0}))
    ok, detail = tie.divergence(" C D")
    assert ok and "near-tie" in detail
    ok, detail = tie.divergence(" A D")  # the second token had a 2.9-nat margin
    assert not ok and "not a near-tie" in detail
    same_batch_noise = Probe(" A B", tie.tokens, ({" A": -0.69, " C": -0.76}, {" B": -0.1, " D": -3.0}))
    assert _burst_check("m", tie, [same_batch_noise], refs={"m": tie}, threshold=1e-3, use_distributions=True).passed


def test_without_logprobs_the_rules_fall_back_to_text():
    a, b = Probe(" x"), Probe(" y")
    assert _applied_check("m", a, b, 1e-3, False).passed
    assert not _applied_check("m", a, a, 1e-3, False).passed
    assert not _burst_check("m", a, [b], refs={"m": a}, threshold=1e-3, use_distributions=False).passed
