"""Sharded runs (attnproto.shard) without a GPU: the CPU backend through a Dask LocalCluster of two
worker processes. A sharded Prototype 1 run equals the serial run in content; a worker that dies
loses only its point, which Dask re-runs on another worker and the run reports; the CLI's flags
fail with one clear line."""
from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import shard_points

from attnproto import cli, shard
from attnproto.experiments import registry
from attnproto.records import GPU_KEY, RecordError, validate_record

distributed = pytest.importorskip("distributed", reason="Dask distributed is not installed (attnproto[dask])")

WORKERS = 2
SEED = 0
# Records of two runs of the same points are compared without their timing fields (the list, and
# why each is one: attnproto.shard.TIMING_RECORD_KEYS and the constants beside it).
_content = shard.record_content


@pytest.fixture(scope="module")
def client():
    cluster = shard.process_cluster(WORKERS)
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def _ctx(tmp_path, name="proto1", **extras):
    status = cli.resolve_backend("cpu")     # the name workers report: a run is on one kind of device
    return registry.ExperimentContext(
        experiment=name, backend="cpu", device=dict(status.info), device_name=cli.device_name(status), driver="test",
        commit="unknown", quick=True, progress=lambda iterable=None, total=None, desc="": iterable,
        out_dir=tmp_path, rng=np.random.default_rng(SEED), seed=SEED, gpu=shard.gpu_identity("cpu"),
        extras=dict(extras))


def _point_key(rec):
    c = rec["config"]
    return (c["head_dim"], c["causal"], c["seq_len"], c["kernel"], c.get("BLOCK_R"), c.get("BLOCK_C"),
            json.dumps({k: v for k, v in c.items() if k not in shard.AUTO_CHOICE_FIELDS}, sort_keys=True))


def _sharded(exp, ctx, client, runs):
    def runner(exp, ctx):
        result, info = shard.run_sharded(exp, ctx, client, cluster="LocalCluster")
        runs.append(info)
        return result
    return registry.run_experiment(exp, ctx, runner)


def test_sharded_proto1_equals_the_serial_run(client, tmp_path):
    exp = registry.get("proto1")
    serial = registry.run_experiment(exp, _ctx(tmp_path / "serial"))
    runs = []
    sharded = _sharded(exp, _ctx(tmp_path / "sharded"), client, runs)
    # Same schema, same records in the same (point) order, equal but for the timing fields.
    assert [set(r) for r in sharded.records] == [set(r) for r in serial.records]
    assert all(GPU_KEY in r and r[GPU_KEY] == shard.CPU_GPU for r in sharded.records)
    assert [_content(r) for r in sharded.records] == [_content(r) for r in serial.records]
    assert [f.id for f in sharded.findings] == [f.id for f in serial.findings]
    # Both workers measured points, none was retried.
    info = runs[0]
    assert len(info.placement) == len({(r["config"]["head_dim"], r["config"]["causal"], r["config"]["seq_len"])
                                       for r in serial.records})
    assert len({p["worker"] for p in info.placement.values()}) == WORKERS
    assert info.retried == []
    # Findings come from the merged set by the experiment's own finish: given the serial run's
    # timings, the sharded points give the serial run's findings, answers and evidence included.
    # (The answers of a comparison of timings flip between any two runs on a shared CPU, serial
    # or not; so they are compared on the same timings.)
    serial_by_point = {_point_key(r): r for r in serial.records}
    points = registry.checked_points(exp.points, _ctx(tmp_path / "again"))
    timed = []
    for p in points:
        recs = [r for r in sharded.records if (r["config"]["head_dim"], r["config"]["causal"],
                                               r["config"]["seq_len"]) == tuple(p.params.values())]
        swapped = []
        for r in recs:
            s = serial_by_point[_point_key(r)]
            assert _content(r) == _content(s)
            swapped.append({**copy.deepcopy(r), "timing": s["timing"], "metrics": s["metrics"], "config": s["config"],
                            "id": s["id"]})
        timed.append(registry.PointResult(p.key, [validate_record(r) for r in swapped], {}))
    again = exp.points.finish(_ctx(tmp_path / "again"), timed)
    assert [(f.id, f.answer, f.evidence) for f in again.findings] == \
        [(f.id, f.answer, f.evidence) for f in serial.findings]


def test_a_dying_worker_loses_only_its_point_which_is_rerun_and_reported(client, tmp_path):
    marker = tmp_path / "killed-once"
    runs = []
    ctx = _ctx(tmp_path, name=shard_points.NAME, marker=str(marker))
    result = _sharded(shard_points.EXPERIMENT, ctx, client, runs)
    assert marker.exists(), "the doomed point never ran"
    assert [r["config"]["i"] for r in result.records] == list(range(shard_points.POINTS_N))
    retried = runs[0].retried
    assert [r["key"] for r in retried] == [shard_points.DOOMED], retried
    assert retried[0]["attempts"] == 2 and retried[0]["workers_lost"] == 1 and retried[0]["error_retries"] == 0
    assert len(set(retried[0]["workers"])) == 2         # the second attempt ran on another worker process
    # Points the dead worker held but had not started ran once elsewhere, and are told apart.
    assert all(r["attempts"] == 1 and r["workers_lost"] == 1 for r in runs[0].reassigned)


def test_cli_scheduler_runs_proto1_on_the_cluster(client, tmp_path, capsys):
    client.wait_for_workers(WORKERS)        # the worker killed by the test above is restarted by its nanny
    rc = cli.main(["run", "proto1", "--backend", "cpu", "--quick", "--no-kb", "--out", str(tmp_path),
                   "--scheduler", client.scheduler.address])
    out = capsys.readouterr().out
    assert rc == cli.EXIT_OK, out
    assert "sharded: 8 points on 2 workers" in out and "retried: none" in out
    (run_json,) = tmp_path.glob("*/proto1/run.json")
    info = json.loads(run_json.read_text())
    assert info["shard"]["workers"] == WORKERS and info["shard"]["retried"] == []
    records = [json.loads(line) for line in (run_json.parent / "records.jsonl").read_text().splitlines()]
    assert records and all(r[GPU_KEY] == shard.CPU_GPU for r in records)


def test_serial_records_say_which_device_ran_them(tmp_path):
    rc = cli.main(["run", "smoke", "--backend", "cpu", "--quick", "--no-kb", "--out", str(tmp_path)])
    assert rc == cli.EXIT_OK
    (path,) = tmp_path.glob("*/smoke/records.jsonl")
    assert all(json.loads(line)[GPU_KEY] == shard.CPU_GPU for line in path.read_text().splitlines())


def test_records_without_gpu_still_read_and_bad_gpu_fields_are_refused(tmp_path):
    ctx = _ctx(tmp_path, name="smoke")
    rec = ctx.record({"n": 1}, {"x": 1.0}, {"median_ms": 1.0, "p10_ms": 1.0, "p90_ms": 1.0, "cv": 0.0})
    old = {k: v for k, v in rec.items() if k != GPU_KEY}
    assert GPU_KEY not in validate_record(old)
    for bad in ({"index": -1, "uuid": "GPU-x"}, {"index": 0, "uuid": ""}, {"index": 0}, "GPU-x"):
        with pytest.raises(RecordError, match="gpu"):
            validate_record({**rec, GPU_KEY: bad})


def _run_cli(capsys, *extra):
    rc = cli.main(["run", "proto1", "--backend", "cpu", "--quick", "--no-kb", *extra])
    return rc, capsys.readouterr().err


def test_cli_gpus_and_scheduler_exclude_each_other(capsys):
    rc, err = _run_cli(capsys, "--gpus", "1", "--scheduler", "tcp://127.0.0.1:1")
    assert rc == cli.EXIT_USAGE and "--gpus and --scheduler exclude each other" in err and "Traceback" not in err


def test_cli_gpus_on_the_cpu_backend_says_use_scheduler(capsys):
    rc, err = _run_cli(capsys, "--gpus", "2")
    assert rc == cli.EXIT_USAGE and "--gpus shards over CUDA GPUs" in err and "--scheduler" in err


def test_cli_more_gpus_than_the_host_has_names_gpus(monkeypatch):
    monkeypatch.setattr(shard, "gpu_count", lambda: 1)
    args = cli.build_parser().parse_args(["run", "proto1", "--gpus", "3"])
    with pytest.raises(cli.CLIError, match=r"^--gpus 3: this host has 1 CUDA GPU visible"):
        cli._start_shards(args, "cuda")


def test_cli_without_dask_says_how_to_install_it(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    rc, err = _run_cli(capsys, "--gpus", "all")
    assert rc == cli.EXIT_USAGE and "pip install attnproto[dask]" in err and "Traceback" not in err


def test_cli_unreachable_scheduler_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(cli, "SCHEDULER_CONNECT_TIMEOUT_S", 1)
    rc, err = _run_cli(capsys, "--scheduler", "tcp://127.0.0.1:9")
    assert rc == cli.EXIT_USAGE and "--scheduler tcp://127.0.0.1:9: cannot connect" in err


def test_cli_gpus_must_be_a_count_or_all(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "proto1", "--gpus", "0"])
    assert exc.value.code == cli.EXIT_USAGE and "positive integer or 'all'" in capsys.readouterr().err


def test_gpu_identity_reads_the_host_index_from_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,0")
    monkeypatch.delenv("ATTNPROTO_CUDA_DEVICE", raising=False)
    ident = shard.gpu_identity("cuda")
    assert ident["index"] == 3
    assert ident["uuid"] == "unknown" or ident["uuid"].startswith("GPU-")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1234")
    assert shard.gpu_identity("cuda")["index"] is None       # pinned by UUID: no host index to tell
    assert shard.gpu_identity("cpu") == shard.CPU_GPU
    with pytest.raises(ValueError, match="backend"):
        shard.gpu_identity("rocm")


def test_the_cuda_cluster_pins_one_gpu_per_worker(monkeypatch):
    """Without dask-cuda: a Dask SpecCluster, one single-threaded worker per GPU, its GPU first in
    CUDA_VISIBLE_DEVICES (no GPU is touched: the workers only report their environment)."""
    monkeypatch.setitem(sys.modules, "dask_cuda", None)
    cluster, description = shard.cuda_cluster([0, 1])
    try:
        with distributed.Client(cluster) as c:
            c.wait_for_workers(2)
            seen = c.run(lambda: __import__("os").environ["CUDA_VISIBLE_DEVICES"])
            threads = {w["nthreads"] for w in c.scheduler_info()["workers"].values()}
    finally:
        cluster.close()
    assert sorted(seen.values()) == ["0,1", "1,0"] and threads == {1}
    assert "SpecCluster" in description and "dask-cuda not installed" in description


def test_workers_that_run_two_points_at_once_are_refused(tmp_path):
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                     dashboard_address=":0")
    try:
        with distributed.Client(cluster) as c, pytest.raises(shard.ShardError, match="--nthreads 1"):
            shard.run_sharded(registry.get("proto1"), _ctx(tmp_path), c)
    finally:
        cluster.close()
