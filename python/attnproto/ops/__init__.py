"""GPU attention operators on torch CUDA tensors.

* :func:`flash_forward` / :func:`time_flash_forward` — Flash Attention forward
  (kernel families registered in :data:`attnproto.ops.flash.KERNELS`; "mma" is
  the mma.sync kernel shaders/cuda/flash_fwd_mma.cu).
* :mod:`attnproto.ops.configs` — its tile configurations, legality and chooser.

Importing this package needs neither torch nor a GPU.
"""
from __future__ import annotations

from .configs import FlashConfig, all_specialisations, choose_config, sweep_space
from .flash import (
    KERNELS,
    FlashProblem,
    PreparedLaunch,
    prepare_forward,
    attention_flops,
    check_flash_inputs,
    flash_forward,
    flash_params,
    register_kernel,
    time_flash_forward,
)

__all__ = [
    "FlashConfig",
    "FlashProblem",
    "KERNELS",
    "PreparedLaunch",
    "prepare_forward",
    "all_specialisations",
    "attention_flops",
    "check_flash_inputs",
    "choose_config",
    "flash_forward",
    "flash_params",
    "register_kernel",
    "sweep_space",
    "time_flash_forward",
]
