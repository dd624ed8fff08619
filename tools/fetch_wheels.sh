#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels the device machine lacks; the `build` stage of
# tools/device_run.sh installs them there (the device has no network, and runs Python 3.12).
#   helion + filecheck: Prototype 5's second DSL (the H200 image has torch and triton already)
#   flash-linear-attention (fla-core): Prototype 6's FLA anchor (pass it as an argument)
#   dask + distributed: sharded runs (attnproto run --gpus, attnproto.shard), with their
#     dependencies that a torch image does not bring (torch brings jinja2, markupsafe and fsspec;
#     pytest brings packaging): the pure-Python ones, and msgpack, psutil, pyyaml and tornado as
#     CPython 3.12 manylinux x86-64 wheels. dask-cuda is not fetched (it brings pandas, bokeh and
#     cuda-core): --gpus then starts the equivalent Dask SpecCluster (attnproto.shard.cuda_cluster).
# Keep the total under the 64 MiB a device call carries (this script prints the total).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
DEVICE_PYTHON=3.12
DASK="dask==2026.7.1 distributed==2026.7.1"
DASK_PURE="click==8.5.1 cloudpickle==3.1.3 toolz==1.2.0 partd==1.4.2 locket==1.0.0 sortedcontainers==2.4.0
           tblib==3.2.2 zict==3.0.0"
DASK_COMPILED="msgpack==1.2.4 psutil==7.2.2 pyyaml==6.0.4 tornado==6.6.1"
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps -d .whl "helion==1.5.1" "filecheck==1.0.6" $DASK $DASK_PURE "${@}"
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps -d .whl --only-binary=:all: --python-version "$DEVICE_PYTHON" \
  --implementation cp --abi "cp${DEVICE_PYTHON/./}" --abi abi3 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_12_x86_64 \
  --platform manylinux2010_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 $DASK_COMPILED
ls -l .whl
du -ch .whl/*.whl | tail -1
