"""A tiny points experiment for tests/test_shard.py whose one point kills its worker process the
first time it runs (a marker file says it did), to check that Dask re-runs it elsewhere and that
the run reports it. Module-level functions: Dask workers import them by name."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from attnproto.experiments import registry

NAME = "shardtest"
POINTS_N = 6
DOOMED = "p1"
# Lets the worker's start event reach the scheduler before the process dies.
EVENT_FLUSH_S = 0.5
SAMPLES_MS = (1.0, 1.1, 1.2)


def points(ctx):
    return [registry.Point(f"p{i}", {"i": i, "marker": ctx.extras["marker"]}) for i in range(POINTS_N)]


def run_point(ctx, point):
    marker = Path(point.params["marker"])
    if point.key == DOOMED and not marker.exists():
        marker.write_text(str(os.getpid()))
        time.sleep(EVENT_FLUSH_S)
        os.kill(os.getpid(), signal.SIGKILL)
    from attnproto.records import timing_from_samples

    rec = ctx.record({"i": point.params["i"]}, {"value_count": float(point.params["i"])},
                     timing_from_samples(SAMPLES_MS))
    return registry.PointResult(point.key, [rec], {"pid": os.getpid()})


def finish(ctx, results):
    return registry.ExperimentResult(records=[r for res in results for r in res.records], findings=[])


PROTOCOL = registry.PointsProtocol(points=points, run_point=run_point, finish=finish)


def run(ctx):
    """Hypothesis: none (a test fixture). Sweep: six trivial points."""
    return registry.run_points(PROTOCOL, ctx)


EXPERIMENT = registry.Experiment(NAME, NAME, "test fixture: a point that kills its worker once", ("cpu",), run,
                                 PROTOCOL)
