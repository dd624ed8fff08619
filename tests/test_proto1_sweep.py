"""Prototype 1's sweep loop on the CPU backend: every family tile gated and timed, the
default call timed at every point next to its tiles, its choice checked against the
finished table."""
from __future__ import annotations

import numpy as np
import pytest

from attnproto.experiments import registry
from attnproto.experiments.proto1 import cpu as p1cpu
from attnproto.experiments.proto1 import sweep
from attnproto.experiments.proto1.common import AUTO, best
from attnproto.ops import families


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(p1cpu, "CPU_HEAD_DIMS", (32,))
    monkeypatch.setattr(p1cpu, "CPU_QUICK_SEQ_LENS", (40, 96))
    monkeypatch.setattr(p1cpu, "CPU_BATCH_HEADS", (1, 2))


def _ctx(tmp_path):
    return registry.ExperimentContext(
        experiment="proto1", backend="cpu", device={"name": "cpu"}, device_name="cpu", driver="test",
        commit="unknown", quick=True, progress=lambda iterable=None, total=None, desc="": iterable,
        out_dir=tmp_path, rng=np.random.default_rng(0))


def test_every_point_has_the_default_call_choosing_the_best_tile(small, tmp_path):
    result = registry.run_experiment(registry.get("proto1"), _ctx(tmp_path))
    tiles = len(families.get("cpu").sweep_space(32, False, "float32", None))
    ours = [r for r in result.records if r["config"].get("family") == "cpu" and r["config"]["kernel"] != AUTO]
    autos = [r for r in result.records if r["config"]["kernel"] == AUTO]
    assert len(ours) == tiles * 2 * 2 and len(autos) == 2 * 2
    for a in autos:
        c = a["config"]
        b = best(result.records, head_dim=c["head_dim"], seq_len=c["seq_len"], causal=c["causal"])
        assert c["chose"] == families.get("cpu").config_label(families.get("cpu").config_for(
            None, b["config"], None)) and "fastest measured" in c["reason"]
    assert {f.slug for f in result.findings} >= {"auto-vs-best-d32-noncausal", "auto-vs-best-d32-causal"}


def test_a_choice_the_finished_table_would_not_make_fails_the_run(small, tmp_path):
    ctx = _ctx(tmp_path)
    bench = p1cpu.bench(ctx)
    records, _, _ = sweep.run_sweep(ctx, bench)
    auto = next(i for i, r in enumerate(records) if r["config"]["kernel"] == AUTO)
    forged = dict(records[auto])
    forged["config"] = {**forged["config"], "chose": "cpu 1x1"}
    records[auto] = forged
    with pytest.raises(registry.ExperimentError, match="chose cpu 1x1 during the sweep"):
        sweep._check_auto_choices(ctx, bench, records)
