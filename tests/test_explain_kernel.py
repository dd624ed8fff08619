"""`attnproto explain-kernel`: what kernel="auto" runs for a shape, and why, without a GPU."""
from __future__ import annotations

import json

import pytest

from attnproto import cli


def _run(capsys, *argv):
    rc = cli.main(["explain-kernel", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_explains_the_choice_for_an_arch(capsys):
    rc, out, _ = _run(capsys, "--d", "128", "--n", "4096", "--causal", "--arch", "sm_90")
    assert rc == 0
    assert "kernel='auto' runs: " in out and "why: " in out and "fastest measured" in out
    assert "wgmma" in out and "mma" in out          # every cuda family has a row


def test_json_verdict_lists_every_family(capsys):
    rc, out, _ = _run(capsys, "--d", "80", "--n", "100", "--arch", "sm_90", "--json")
    verdict = json.loads(out)
    assert rc == 0 and verdict["family"] == "mma"
    rows = {r["family"]: r for r in verdict["families"]}
    assert not rows["wgmma"]["supported"] and "head_dim 80" in rows["wgmma"]["why"]


def test_sm80_falls_back_to_mma_with_the_reason(capsys):
    rc, out, _ = _run(capsys, "--d", "64", "--n", "512", "--arch", "sm_80")
    assert rc == 0 and "runs: mma" in out and "compute capability 9.0" in out


@pytest.mark.parametrize("argv, match", [
    (["--d", "72", "--n", "4", "--arch", "sm_90"], "q: head_dim 72"),
    (["--d", "64", "--n", "4", "--arch", "sm_91"], "arch"),
    (["--d", "64", "--n", "4", "--heads", "6", "--kv-heads", "4", "--arch", "sm_90"], "--kv-heads"),
])
def test_bad_requests_are_one_line_errors(capsys, argv, match):
    rc, _, err = _run(capsys, *argv)
    assert rc == 2 and match in err and "Traceback" not in err and err.count("\n") == 1


def test_host_backend_explains_the_cpu_family(capsys):
    rc, out, _ = _run(capsys, "--d", "64", "--n", "64", "--backend", "cpu")
    assert rc == 0 and "runs: cpu" in out
