#!/usr/bin/env bash
# The test command (README): install attnproto with its test and NVRTC extras,
# then run the suite. GPU tests are skipped (with the reason) where no CUDA GPU
# is present; every CUDA kernel specialisation is still compiled with NVRTC.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
python -m pip install -q ".[test,cuda]"
echo "test.sh: installed attnproto with its test and NVRTC extras (torch among them) in $((SECONDS - start)) s"
export ATTNPROTO_REQUIRE_NVRTC=1
# Run from outside the source tree so that the installed package (with its native module) is tested.
cd tests
python -m pytest -q -ra -p no:cacheprovider .
