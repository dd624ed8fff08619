#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the pure-Python wheels the device machine lacks; the
# `build` stage of tools/device_run.sh installs them there (the device has no network).
#   helion + filecheck: Prototype 5's second DSL (the H200 image has torch and triton already)
#   flash-linear-attention (fla-core): Prototype 6's FLA anchor
# Keep the total under the 64 MiB a device call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps -d .whl "helion==1.5.1" "filecheck==1.0.6" "${@}"
ls -l .whl
