"""Attention operators: the flash front door and the kernel families behind it.

* :func:`flash_forward` / :func:`prepare_forward` / :func:`time_flash_forward` — one
  call for every backend, ``kernel="auto"`` by default (:mod:`attnproto.ops.flash`);
* :data:`FAMILIES` — the kernel families, one list (:mod:`attnproto.ops.families`);
* :mod:`attnproto.ops.chooser` — the measured table ``kernel="auto"`` chooses from;
* :mod:`attnproto.ops.configs` — the mma.sync family's tiles and legality.

Importing this package needs neither torch nor a GPU.
"""
from __future__ import annotations

from .configs import FlashConfig, all_specialisations, choose_config, sweep_space
from .families import FAMILIES
from .flash import (
    AUTO,
    FlashProblem,
    HostLaunch,
    PreparedLaunch,
    attention_flops,
    check_flash_inputs,
    explain,
    flash_forward,
    flash_params,
    prepare_forward,
    time_flash_forward,
)

__all__ = [
    "AUTO",
    "FAMILIES",
    "FlashConfig",
    "FlashProblem",
    "HostLaunch",
    "PreparedLaunch",
    "all_specialisations",
    "attention_flops",
    "check_flash_inputs",
    "choose_config",
    "explain",
    "flash_forward",
    "flash_params",
    "prepare_forward",
    "sweep_space",
    "time_flash_forward",
]
