#!/usr/bin/env bash
# tools/device_run.sh — everything attnproto does on a GPU machine, in one call.
#
#   bash tools/device_run.sh STAGE [STAGE...]
#
# Stages (run in the order given):
#   build       pip install . without build isolation (the device has no network);
#               wheels in .whl/ (e.g. fla-core) are installed to /tmp/site first
#   precompile  every kernel specialisation into the archive, 16 NVRTC compiles at once -> $OUT/precompile.log
#   test        the whole pytest suite, GPU tests included            -> $OUT/pytest.log
#   test-gpu    only the tests marked gpu ($PYTEST_ARGS: files/-k, default tests) -> $OUT/pytest-gpu.log
#   sanitize    compute-sanitizer memcheck, racecheck, synccheck, initcheck on small shapes of every
#               kernel family -> $OUT/sanitize.log (the full per-tool log: $OUT/sanitize-full.log)
#   leakcheck   attnproto leakcheck --backend cuda: 1000 calls of every GPU op, memory growth < 1 %
#               -> results/<device>/leakcheck/leakcheck.json (in $OUT/results.tgz) and $OUT/leakcheck.log
#   run:NAME    attnproto run NAME --backend cuda $RUN_ARGS (results/ updated) -> $OUT/results.tgz
#               (e.g. RUN_ARGS="--gpus all": the points on every GPU, attnproto.shard)
#   bench       build and run the C++ benchmark binaries               -> $OUT/bench.log
#
# Exact build command on the device (documented in README.md):
#   python3 -m pip install --no-build-isolation --no-deps .
# $OUT is set by the device tool; elsewhere it defaults to ./device-out.
# The device receives the tree without .git: pass the sha the results belong to as
# ATTNPROTO_COMMIT=<sha> (and ATTNPROTO_DIRTY=0 when the tree is the committed one);
# records and findings carry it.
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export ATTNPROTO_CACHE_DIR=${ATTNPROTO_CACHE_DIR:-/tmp/attnproto-cache}
status=0
ran_experiments=0

note() { printf '\n=== %s ===\n' "$*"; }

for stage in "$@"; do
  case "$stage" in
    build)
      note build
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
      python3 -c 'import sys, nanobind, scikit_build_core, torch; print(sys.version.split()[0], "nanobind", nanobind.__version__, "skbuild", scikit_build_core.__version__, "torch", torch.__version__)' | tee -a "$OUT/device.txt"
      if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || status=1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
      fi
      python3 -m pip install --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
      tail -1 "$OUT/build.log"
      (cd /tmp && python3 -m attnproto info) || status=1
      ;;
    precompile)
      note precompile
      (cd /tmp && python3 -m attnproto kernels precompile --jobs "$(nproc)") >"$OUT/precompile.log" 2>&1 || status=1
      tail -1 "$OUT/precompile.log"
      ;;
    test)
      note test
      python3 -m pytest -q -ra -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest.log" | tail -60
      [ "${PIPESTATUS[0]}" = 0 ] || status=1
      ;;
    test-gpu)
      note test-gpu
      # shellcheck disable=SC2086
      timeout "${STAGE_TIMEOUT:-480}" python3 -m pytest -q -ra -m gpu -p no:cacheprovider --timeout 300 ${PYTEST_ARGS:-tests} \
        --junitxml="$OUT/pytest-gpu.xml" 2>&1 | tee "$OUT/pytest-gpu.log" | tail -80
      [ "${PIPESTATUS[0]}" = 0 ] || status=1
      ;;
    sanitize)
      note sanitize
      python3 tools/sanitize.py --log "$OUT/sanitize-full.log" 2>&1 | tee "$OUT/sanitize.log" | tail -30
      [ "${PIPESTATUS[0]}" = 0 ] || status=1
      ;;
    leakcheck)
      note leakcheck
      python3 -m attnproto leakcheck --backend cuda --out results 2>&1 | tee "$OUT/leakcheck.log" | tail -40
      [ "${PIPESTATUS[0]}" = 0 ] || status=1
      ran_experiments=1
      ;;
    run:*)
      name=${stage#run:}
      note "run $name"
      # proto4 measures cold compiles: keep the driver's on-disk compute cache (which NVRTC uses
      # for PTX it has seen before) out of it.
      cache_env=""
      [ "$name" = proto4 ] && cache_env="CUDA_CACHE_DISABLE=1"
      # shellcheck disable=SC2086
      env $cache_env python3 -m attnproto run "$name" --backend cuda --out results ${RUN_ARGS:-} 2>&1 | tee -a "$OUT/experiments.log" | tail -80
      [ "${PIPESTATUS[0]}" = 0 ] || status=1
      ran_experiments=1
      ;;
    bench)
      note bench
      cmake -S . -B build/bench -G Ninja -DATTNPROTO_BUILD_BENCH=ON -DATTNPROTO_BUILD_PYTHON=OFF >"$OUT/bench.log" 2>&1 &&
        cmake --build build/bench >>"$OUT/bench.log" 2>&1 || { tail -30 "$OUT/bench.log"; status=1; continue; }
      python3 tools/bench_args.py >"$OUT/bench_args.txt" || { status=1; continue; }
      while read -r line; do
        # shellcheck disable=SC2086
        build/bench/bench/attnproto_bench_flash $line --warmup 10 --iters 100 2>&1 | tee -a "$OUT/bench.log" || status=1
      done <"$OUT/bench_args.txt"
      ;;
    *)
      echo "unknown stage: $stage" >&2
      exit 2
      ;;
  esac
done

if [ "$ran_experiments" = 1 ]; then
  tar czf "$OUT/results.tgz" results
fi
exit $status
