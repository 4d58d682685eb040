#!/usr/bin/env bash
# Issue 11's GPU checks in one run: the GPU tests, then the GPU benchmark. For a machine with an
# NVIDIA GPU, CuPy, PyTorch and numpy but no TensorFlow and no package index. First, on a machine
# with TensorFlow:
#     python scripts/benchmark_gpu.py --prepare gpu_assets   # models, CPU outputs, wheels
# then, from the repository root on the GPU machine, with gpu_assets/ beside it:
#     OUT=gpu_results scripts/gpu_session.sh     # PYTHON=... for another interpreter than python3
# $OUT gets environment.txt, build.txt, tests.txt, benchmark.txt, benchmark.json, benchmarks.md
# (docs/benchmarks.md with its GPU section written), profile.txt (scripts/profile_gpu.py: the
# 1-bit MMA's rate, the slow shapes against it, the whole model's time kernel by kernel, then the
# same shapes under Nsight Compute where the machine has it), instructions.txt and source.csv (Nsight
# Compute's instruction mix, stall sampling and per-instruction counts of the two shapes with the least
# margin over cuDNN's bf16). Each step runs even if one before it failed, under a time limit (TEST_SECONDS, BENCHMARK_SECONDS; the profile gets what is left of
# TOTAL_SECONDS) so that one hang cannot take the session and the whole run fits in 10 minutes; the
# exit status is the tests'.
set -u
# the GPU machine's python3 is the one with PyTorch and CuPy (a plain `python` may be another, or none)
PYTHON=${PYTHON:-python3}
ASSETS=${ASSETS:-gpu_assets}
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
# only the wheels whose module this Python lacks (each wheel's name is its module's): a newer copy
# of one it has (packaging, typing_extensions, pytest) would shadow the one PyTorch and CuPy were
# installed with
site=$(mktemp -d)
missing=()
for wheel in "$ASSETS"/wheels/*.whl; do
    module=$(basename "$wheel" | cut -d- -f1)
    "$PYTHON" -c "import $module" 2> /dev/null || missing+=("$wheel")
done
echo "installing: ${missing[*]:-nothing}" > "$OUT/build.txt"
[ ${#missing[@]} -eq 0 ] || "$PYTHON" -m pip install -q --no-index --no-deps --target "$site" "${missing[@]}" >> "$OUT/build.txt" 2>&1
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
# pytest plugins installed there (xdist, cov, hypothesis, ...) are not needed, nor loaded
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
{ nvidia-smi; "$PYTHON" -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)"
  "$PYTHON" -c "import torch; print('torch', torch.__version__, torch.backends.cudnn.version())"; } > "$OUT/environment.txt" 2>&1
# the C++ CPU kernels, for the GPU-vs-CPU comparisons (the tests skip those without them)
timeout 90 "$PYTHON" setup.py -q build_ext --inplace -j 4 >> "$OUT/build.txt" 2>&1 || echo "C++ kernels not built: see build.txt"
LARQ_LANDMARKS_GPU_ASSETS="$ASSETS" timeout "${TEST_SECONDS:-150}" "$PYTHON" -m pytest --noconftest -p no:cacheprovider -o addopts="" -q -rs \
    tests/test_runtime_cuda.py > "$OUT/tests.txt" 2>&1
status=$?
tail -n 30 "$OUT/tests.txt"
cp docs/benchmarks.md "$OUT/benchmarks.md"
timeout "${BENCHMARK_SECONDS:-330}" "$PYTHON" scripts/benchmark_gpu.py --assets "$ASSETS" --json "$OUT/benchmark.json" --markdown "$OUT/benchmarks.md" \
    > "$OUT/benchmark.txt" 2>&1
# a benchmark cut short by its limit saved what it measured: its markdown from that
[ -f "$OUT/benchmark.json" ] && "$PYTHON" scripts/benchmark_gpu.py --from-json "$OUT/benchmark.json" --markdown "$OUT/benchmarks.md"
tail -n 60 "$OUT/benchmark.txt"
# what is left of the run's time (bash's SECONDS: since the script started) for the profile
left=$(( ${TOTAL_SECONDS:-570} - SECONDS ))
if [ "$left" -gt 20 ]; then
    timeout $(( left < 90 ? left : 90 )) "$PYTHON" scripts/profile_gpu.py --assets "$ASSETS" > "$OUT/profile.txt" 2>&1
fi
# Nsight Compute: only the launches between cudaProfilerStart and Stop (profile_gpu.py's chosen
# convolutions, once each), the clocks left as they are
NCU=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2> /dev/null | tail -n 1)}
left=$(( ${TOTAL_SECONDS:-570} - SECONDS ))
if [ -n "$NCU" ] && [ "$left" -gt 30 ]; then
    timeout "$left" "$NCU" --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis \
        --section ComputeWorkloadAnalysis "$PYTHON" scripts/profile_gpu.py --assets "$ASSETS" --runs 3 \
        --iterations 2000 --model-batch 0 >> "$OUT/profile.txt" 2>&1
else
    echo "Nsight Compute not run: ${NCU:-no ncu here}, ${left} s left" >> "$OUT/profile.txt"
fi
# the two shapes with the least margin over cuDNN's bf16 at batch 32 (128x128x64 -> 64, 128x128x32 -> 32;
# the two still slower after the fifth session's second run), the default kernel once each: its
# instruction mix (executed instructions by opcode) and where its warps stall (instructions.txt), and
# each SASS instruction's counts, stall samples and shared-memory bank conflicts (source.csv: what
# found the count staging's conflicts); a flag this ncu lacks only fails its step
left=$(( ${TOTAL_SECONDS:-570} - SECONDS ))
if [ -n "$NCU" ] && [ "$left" -gt 30 ]; then
    timeout "$left" "$NCU" --clock-control none --profile-from-start off --kernel-name regex:bconv2d_tensor_cores \
        --section InstructionStats --section SourceCounters --section WarpStateStats \
        --metrics sass__inst_executed_per_opcode,smsp__sass_inst_executed.sum --print-metric-instances values \
        "$PYTHON" scripts/profile_gpu.py --assets "$ASSETS" --shapes 128x64x64,128x32x32 --runs 1 --iterations 2000 \
        --model-batch 0 > "$OUT/instructions.txt" 2>&1
fi
left=$(( ${TOTAL_SECONDS:-570} - SECONDS ))
if [ -n "$NCU" ] && [ "$left" -gt 30 ]; then
    timeout "$left" "$NCU" --clock-control none --profile-from-start off --kernel-name regex:register_loads \
        --launch-count 3 --section SourceCounters --page source --print-source sass --csv \
        "$PYTHON" scripts/profile_gpu.py --assets "$ASSETS" --shapes 128x64x64,128x32x32 --runs 1 --iterations 2000 \
        --model-batch 0 > "$OUT/source.csv" 2>&1
fi
tail -n 25 "$OUT/profile.txt"
exit $status
