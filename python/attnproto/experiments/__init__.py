"""attnproto experiments.

Importing this package registers every experiment: each submodule named in
``EXPERIMENT_MODULES`` is imported explicitly (no directory scanning, so a
stray file never registers by accident and a broken module fails loudly).
"""
from __future__ import annotations

import importlib

from . import registry
from .registry import (
    Experiment,
    ExperimentContext,
    ExperimentError,
    ExperimentResult,
    UnknownExperimentError,
    all_experiments,
    experiment,
    get,
    names,
    run_experiment,
    supporting,
)

# Add new experiment modules here.
EXPERIMENT_MODULES = ("smoke", "proto1", "proto2", "proto3", "proto4", "proto5", "proto6", "proto7", "proto8")

for _module in EXPERIMENT_MODULES:
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["EXPERIMENT_MODULES", *registry.__all__]
