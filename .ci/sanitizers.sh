#!/usr/bin/env bash
# Builds the custom-op library with AddressSanitizer + UndefinedBehaviorSanitizer
# in its own build folder and runs the C++ kernel tests and the op tests under it.
# Called by .ci/run after the normal tests (needs cmake, g++, and the
# project's Python environment active). Takes a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

build=build/asan
mkdir -p build
python=$(command -v python || command -v python3)
cmake -S runtime -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFGQ_SANITIZE=address,undefined \
  -DFGQ_BUILD_TESTS=ON -DPython_EXECUTABLE="$python" > "$build.configure.log" 2>&1 || {
  cat "$build.configure.log"
  exit 1
}
cmake --build "$build" -j "$(nproc)"

export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

echo "== sanitizers: C++ kernel tests"
"$build/fgq_kernel_tests"
"$build/fgq_depthwise_tests"

echo "== sanitizers: op tests in onnxruntime (FGQ_OPS_LIBRARY=$build/libfgq_ops.so)"
# libstdc++ preloaded too: ASan must see __cxa_throw at start-up (python itself is C).
# `pytest`, not `python -m pytest`: the latter puts the source tree first on
# sys.path, where fgq_onnx has no passes subpackage and no built library.
asan_runtime="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)"
FGQ_OPS_LIBRARY="$PWD/$build/libfgq_ops.so" LD_PRELOAD="$asan_runtime" \
  pytest -q -p no:cacheprovider tests/test_runtime_ops.py tests/test_runtime_malformed.py tests/test_runtime_golden.py tests/test_custom_format.py \
  tests/test_runtime_depthwise.py tests/test_runtime_folded_extremes.py tests/test_runtime_narrow_conv.py \
  tests/test_runtime_activation.py tests/test_int8_weights.py

echo "== sanitizers: fuzzed com.fgq nodes (each case in a worker process under ASan/UBSan: an abort fails the test)"
FGQ_OPS_LIBRARY="$PWD/$build/libfgq_ops.so" LD_PRELOAD="$asan_runtime" FGQ_FUZZ_EXAMPLES="${FGQ_FUZZ_EXAMPLES:-60}" \
  pytest -q -p no:cacheprovider tests/test_fuzz.py -k custom_op
echo "== sanitizers: passed"
