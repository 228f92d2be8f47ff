"""The suite's own rules, run on a throwaway test file with this suite's conftest: a skip names its
reason, and DISTILLSWEEP_REQUIRE_ALL=1 (as .ci/run sets) turns it into a failure."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent

SKIPPING = """
import pytest

def test_needs_a_tool_this_machine_lacks():
    pytest.skip("no frobnicator here: install it, or run .ci/run")

def test_runs():
    assert True
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    """The throwaway file beside a copy of this suite's conftest, run in this process (a subprocess
    would import torch and transformers again: seconds for a check of two hooks)."""
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    pytester.makepyfile(test_skipping=SKIPPING)
    return pytester


def test_a_skip_names_its_reason_and_passes(suite, monkeypatch):
    monkeypatch.delenv("DISTILLSWEEP_REQUIRE_ALL", raising=False)
    result = suite.runpytest_inprocess("-ra", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*no frobnicator here: install it, or run .ci/run*"])
    assert result.ret == 0


def test_require_all_turns_every_skip_into_a_failure(suite, monkeypatch):
    monkeypatch.setenv("DISTILLSWEEP_REQUIRE_ALL", "1")
    result = suite.runpytest_inprocess("-ra", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*DISTILLSWEEP_REQUIRE_ALL=1 makes every skip a failure*no frobnicator here*"])
    assert result.ret == 1
