"""Experiment registry.

An experiment is a function ``run(ctx) -> ExperimentResult`` decorated with
:func:`experiment`; its docstring must state the hypothesis and the sweep.
Experiments register when :mod:`attnproto.experiments` is imported (it imports
its submodules by name).

An experiment whose sweep is a list of independent points can say so with a
:class:`PointsProtocol` (``@experiment(..., points=...)``): ``points(ctx)`` lists them
(each :class:`Point` is one shape/config group *with its anchors*, so a point and the
anchors it is compared with are measured on the same device), ``run_point(ctx, point)``
measures one into a :class:`PointResult`, and ``finish(ctx, results)`` computes the
findings and artefacts from all of them, in ``points(ctx)`` order. Its ``run`` is then
:func:`run_points` (the serial run), and ``attnproto run --gpus/--scheduler`` hands the
points to Dask workers instead (:mod:`attnproto.shard`): the same three functions, so a
sharded run's records and findings come out of the same code as a serial run's. Every
point draws its inputs from :meth:`ExperimentContext.point_rng` (the run's seed and the
point's key), never from a stream shared with other points, so a point's inputs do not
depend on where or after which other points it ran.

An experiment whose findings are functions of its records says so with
``@experiment(..., rederive=fn)``: ``fn(ctx, records, previous) -> Rederivation`` runs the
experiment's own finding generators over the records of a committed run (nothing measured;
``previous``: that directory's live findings) and names, with the reason, the findings it
cannot compute from the records, which are then kept as they are. ``attnproto kb rederive``
(:mod:`attnproto.rederive`) calls it.
"""
from __future__ import annotations

import inspect
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import lab
from ..findings import BACKENDS, Finding, make_finding, slugify
from ..records import EXPERIMENT_NAME_RE, check_findings_against_records, make_record, validate_record

__all__ = [
    "Experiment",
    "ExperimentContext",
    "ExperimentError",
    "ExperimentResult",
    "Point",
    "PointResult",
    "PointsProtocol",
    "Rederivation",
    "RederiveHook",
    "UnknownExperimentError",
    "all_experiments",
    "experiment",
    "get",
    "names",
    "check_result",
    "checked_points",
    "run_experiment",
    "run_points",
    "supporting",
]


class ExperimentError(RuntimeError):
    """An experiment failed its own checks (e.g. a result outside tolerance) or broke the contract."""


class UnknownExperimentError(LookupError):
    """No experiment of that name is registered."""


@dataclass(frozen=True)
class ExperimentResult:
    records: list[dict[str, Any]]
    findings: list[Finding]
    #: Optional condensed rows printed instead of the full record tables (e.g. best per shape, ratios).
    summary: list[dict[str, Any]] = field(default_factory=list)
    #: The longest single timed device dispatch of the run (ms; 0 when nothing was device-timed),
    #: set by :func:`run_experiment` from the lab's watchdog.
    longest_dispatch_ms: float = 0.0


@dataclass
class ExperimentContext:
    """What an experiment gets to run.

    backend: "cpu" | "cuda" | "metal".  device: the backend's device-info dict
    (``device_name`` is its display name).  quick: run the small sweep (CI).
    progress: bar factory, ``progress(iterable=None, total=None, desc="")``.
    out_dir: where the experiment writes extra artefacts (tile_table.json, summary.json):
    a staging directory beside the final result directory, swapped in only when the
    whole run completed (attnproto.records.staged_results_dir); never read the
    previous run's artefacts from it.
    rng: seeded numpy Generator.  commit/driver: provenance for records.
    seed: the run's seed (``--seed``), from which :meth:`point_rng` derives each point's stream.
    gpu: which device measures (``{"index", "uuid"}``, :func:`attnproto.shard.gpu_identity`),
    stamped on every record; None leaves records without it (contexts built by hand in tests).
    """

    experiment: str
    backend: str
    device: dict[str, Any]
    device_name: str
    driver: str
    commit: str
    quick: bool
    progress: Callable[..., Any]
    out_dir: Path
    rng: np.random.Generator
    extras: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    gpu: dict[str, Any] | None = None

    def point_rng(self, key: str) -> np.random.Generator:
        """A generator for the point (or gate, or any unit of work) named ``key``: a function of
        the run's seed, the experiment and the key only, whichever process or GPU runs it."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"key must be a non-empty string, got {key!r}")
        return np.random.default_rng([int(self.seed), zlib.crc32(self.experiment.encode("utf-8")),
                                      zlib.crc32(key.encode("utf-8"))])

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {BACKENDS}")
        if not isinstance(self.rng, np.random.Generator):
            raise TypeError(f"rng must be numpy.random.Generator, got {type(self.rng).__name__}")

    def record(self, config: Mapping[str, Any], metrics: Mapping[str, float], timing: Any) -> dict[str, Any]:
        """A validated sweep record stamped with this run's device/backend/driver/commit."""
        return make_record(experiment=self.experiment, config=config, metrics=metrics, timing=timing,
                           device=self.device_name, backend=self.backend, driver=self.driver,
                           commit=self.commit, gpu=self.gpu)

    def finding(self, *, prototype: str, title: str, claim: str, evidence: Mapping[str, float],
                config: Mapping[str, Any], cv: float, records: Iterable[Mapping[str, Any]],
                slug: str | None = None, answer: Mapping[str, Any] | None = None) -> Finding:
        """A measured finding on this run's device/backend citing ``records`` (record dicts).

        ``config``: the question's parameters only (head_dim, seq_len, causal, the
        swept shapes), part of the id; ``answer``: the measured choice (the winning
        kernel / tile, ...), not part of the id, so a re-run that picks another
        winner supersedes this finding instead of adding a contradictory one.
        """
        return make_finding(prototype=prototype, title=title, claim=claim, evidence=evidence, config=config,
                            device=self.device_name, backend=self.backend, commit=self.commit, cv=cv,
                            records=[r["id"] for r in records], slug=slug, answer=answer)


@dataclass(frozen=True)
class Point:
    """One independent unit of a sweep. ``key``: unique in the run, names the point in logs and
    retry reports and seeds its inputs; ``params``: JSON-serialisable, what ``run_point`` needs."""

    key: str
    params: Mapping[str, Any]


@dataclass
class PointResult:
    """What one point measured: its records, and JSON-serialisable side results for ``finish``
    (e.g. configurations rejected by a correctness gate, anchors that were unavailable)."""

    key: str
    records: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PointsProtocol:
    """An experiment's sweep as independent points (module doc). The three functions must be
    module-level (Dask workers import them by name)."""

    points: Callable[[ExperimentContext], list[Point]]
    run_point: Callable[[ExperimentContext, Point], PointResult]
    finish: Callable[[ExperimentContext, list[PointResult]], ExperimentResult]

    def __post_init__(self) -> None:
        for name in ("points", "run_point", "finish"):
            if not callable(getattr(self, name)):
                raise TypeError(f"PointsProtocol.{name} must be callable")


def checked_points(protocol: PointsProtocol, ctx: ExperimentContext) -> list[Point]:
    """``protocol.points(ctx)``, checked: a non-empty list of Points with unique keys."""
    pts = list(protocol.points(ctx))
    if not pts or not all(isinstance(p, Point) for p in pts):
        raise ExperimentError(f"experiment {ctx.experiment!r}: points() must return a non-empty list of Point")
    keys = [p.key for p in pts]
    if len(set(keys)) != len(keys):
        raise ExperimentError(f"experiment {ctx.experiment!r}: point keys are not unique: {keys}")
    return pts


def run_points(protocol: PointsProtocol, ctx: ExperimentContext) -> ExperimentResult:
    """The serial run of a points experiment: every point in order in this process, then finish."""
    pts = checked_points(protocol, ctx)
    results = [protocol.run_point(ctx, p) for p in ctx.progress(pts, desc=f"{ctx.experiment}[{ctx.backend}]")]
    return protocol.finish(ctx, results)


@dataclass(frozen=True)
class Rederivation:
    """What an experiment's rederive hook computed from a committed run's records.

    ``findings``: the findings its generators produce from the records (live, stamped by the
    context). ``kept``: slug -> why the finding of that slug needs data that is not in the
    records (it is left as it is, not retired). ``unsupported``: non-empty when nothing can be
    derived for this run (e.g. a backend whose findings rest on artefacts not recorded): the
    reason; every previous finding is then left as it is.
    """

    findings: list[Finding] = field(default_factory=list)
    kept: Mapping[str, str] = field(default_factory=dict)
    unsupported: str = ""


#: ``rederive(ctx, records, previous) -> Rederivation`` (see :class:`Rederivation`).
RederiveHook = Callable[[ExperimentContext, list[dict[str, Any]], list[Finding]], Rederivation]


@dataclass(frozen=True)
class Experiment:
    name: str
    prototype: str
    description: str
    backends: tuple[str, ...]
    func: Callable[[ExperimentContext], ExperimentResult]
    #: The sweep as independent points, when it is one (shardable over GPUs); None: serial only.
    points: PointsProtocol | None = None
    #: Re-runs the finding generators over committed records (module doc); None: not re-derivable.
    rederive: RederiveHook | None = None

    @property
    def doc(self) -> str:
        return inspect.cleandoc(self.func.__doc__ or "")

    def supports(self, backend: str) -> bool:
        return backend in self.backends


_REGISTRY: dict[str, Experiment] = {}


def experiment(name: str, prototype: str, description: str, *, backends: Sequence[str],
               points: PointsProtocol | None = None, rederive: RederiveHook | None = None) -> Callable:
    """Register ``run(ctx) -> ExperimentResult`` under ``name``.

    ``backends`` lists the backends the experiment runs on (subset of
    ("cpu", "cuda", "metal")).  The function's docstring must state the
    hypothesis and the sweep.  ``points``: the sweep as independent points
    (module doc); ``run`` should then be ``run_points(points, ctx)``.  ``rederive``: the
    findings as a function of the records (module doc, :class:`Rederivation`).
    """
    if points is not None and not isinstance(points, PointsProtocol):
        raise TypeError(f"points must be a PointsProtocol, got {type(points).__name__}")
    if rederive is not None and not callable(rederive):
        raise TypeError(f"rederive must be callable, got {type(rederive).__name__}")
    if not isinstance(name, str) or not EXPERIMENT_NAME_RE.fullmatch(name):
        raise ValueError(f"experiment name {name!r} must match {EXPERIMENT_NAME_RE.pattern}")
    if not isinstance(prototype, str) or not prototype or slugify(prototype) != prototype:
        raise ValueError(f"prototype {prototype!r} must be a slug (lower-case a-z, 0-9, '-')")
    if not isinstance(description, str) or not description.strip():
        raise ValueError("description must be a non-empty string")
    if isinstance(backends, str):
        raise TypeError("backends must be a sequence of backend names, not a single string")
    backends = tuple(backends)
    bad = [b for b in backends if b not in BACKENDS]
    if not backends or bad:
        raise ValueError(f"backends must be a non-empty subset of {BACKENDS}, got {backends}")

    def register(func: Callable[[ExperimentContext], ExperimentResult]) -> Callable:
        if not callable(func):
            raise TypeError(f"@experiment({name!r}) must decorate a function")
        doc = inspect.cleandoc(func.__doc__ or "").lower()
        if "hypothesis" not in doc or "sweep" not in doc:
            raise ValueError(f"experiment {name!r}: the docstring must state the hypothesis and the sweep "
                             "(mention both words)")
        if name in _REGISTRY and _REGISTRY[name].func is not func:
            raise ValueError(f"experiment {name!r} is already registered by {_REGISTRY[name].func.__module__}")
        _REGISTRY[name] = Experiment(name, prototype, description.strip(), backends, func, points, rederive)
        return func

    return register


def names() -> list[str]:
    return sorted(_REGISTRY)


def all_experiments() -> list[Experiment]:
    return [_REGISTRY[n] for n in names()]


def get(name: str) -> Experiment:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(names()) or "(none registered)"
        raise UnknownExperimentError(f"unknown experiment {name!r}; known: {known}") from None


def supporting(backend: str) -> list[Experiment]:
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    return [e for e in all_experiments() if e.supports(backend)]


def run_experiment(exp: Experiment, ctx: ExperimentContext,
                   runner: Callable[[Experiment, ExperimentContext], ExperimentResult] | None = None
                   ) -> ExperimentResult:
    """Run ``exp`` and check the contract: result type, records, finding/record consistency.

    ``runner(exp, ctx)`` runs it instead of ``exp.func(ctx)`` (the sharded run,
    :func:`attnproto.shard.run_sharded`); its result is checked the same way.
    """
    if not exp.supports(ctx.backend):
        raise ExperimentError(f"experiment {exp.name!r} does not support backend {ctx.backend!r} "
                              f"(supports: {', '.join(exp.backends)})")
    if ctx.experiment != exp.name:
        raise ExperimentError(f"context is for experiment {ctx.experiment!r}, not {exp.name!r}")
    with lab.dispatch_watch() as watch:
        result = exp.func(ctx) if runner is None else runner(exp, ctx)
    if not watch.ok:
        raise ExperimentError(
            f"watchdog: experiment {exp.name!r} timed a single dispatch of {watch.longest_ms:.1f} ms, over the "
            f"{lab.WATCHDOG_MAX_DISPATCH_MS:.0f} ms limit (attnproto.lab.WATCHDOG_MAX_DISPATCH_MS); split that work")
    return check_result(exp, ctx, result, longest_dispatch_ms=watch.longest_ms)


def check_result(exp: Experiment, ctx: ExperimentContext, result: Any,
                 longest_dispatch_ms: float = 0.0) -> ExperimentResult:
    """The contract of an experiment's result (see :func:`run_experiment`); ``longest_dispatch_ms``: the
    watchdog's longest timed dispatch of the run in this process (sharded points report theirs in the result)."""
    if not isinstance(result, ExperimentResult):
        raise ExperimentError(f"experiment {exp.name!r} returned {type(result).__name__}, expected ExperimentResult")
    records = [validate_record(r) for r in result.records]
    for rec in records:
        if rec["backend"] != ctx.backend or rec["device"] != ctx.device_name or rec["experiment"] != exp.name:
            raise ExperimentError(f"record {rec['id']!r} is labelled {rec['experiment']}/{rec['backend']}/"
                                  f"{rec['device']!r}, but this run is {exp.name}/{ctx.backend}/{ctx.device_name!r}")
    findings: list[Finding] = []
    by_id: dict[str, Finding] = {}
    for f in result.findings:
        if not isinstance(f, Finding):
            raise ExperimentError(f"experiment {exp.name!r} returned a {type(f).__name__} among its findings")
        if not f.is_live:
            raise ExperimentError(f"experiment {exp.name!r} returned the superseded finding {f.id!r}")
        if f.source == "measured" and (f.backend != ctx.backend or f.device != ctx.device_name):
            raise ExperimentError(f"measured finding {f.id!r} is labelled {f.backend}/{f.device!r}, "
                                  f"but this run is {ctx.backend}/{ctx.device_name!r}")
        seen = by_id.get(f.id)
        if seen is None:
            by_id[f.id] = f
            findings.append(f)
        elif not seen.same_content(f):
            raise ExperimentError(
                f"experiment {exp.name!r} returned two different findings with id {f.id!r} (they differ in "
                f"{', '.join(seen.changed_fields(f))}): an id names one question, so one run gives it one "
                "answer; put the question's parameters in config= and the measured choice in answer=")
    check_findings_against_records(findings, records)
    return ExperimentResult(records=records, findings=findings, summary=list(result.summary),
                            longest_dispatch_ms=max(longest_dispatch_ms, result.longest_dispatch_ms))
