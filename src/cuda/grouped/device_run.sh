#!/bin/bash
# Device-side driver for the grouped engineer's runs: tests, memcheck, benchmark.
cd "$(dirname "$0")"
CUBLAS_DIR=$(dirname "$(find /usr/local/cuda* /opt /usr/lib -name 'libcublas.so.1*' 2>/dev/null | head -1)")
export LD_LIBRARY_PATH=$PWD/lib:$CUBLAS_DIR:$LD_LIBRARY_PATH
echo "cublas dir: $CUBLAS_DIR"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
MODE=${1:-all}
if [[ $MODE == all || $MODE == test ]]; then
  timeout ${TEST_TIMEOUT:-300} ./tmoe_cuda_tests --gtest_filter="${TEST_FILTER:-*Grouped*:-GroupedBench.*}" > $OUT/tests.log 2>&1
  echo "tests rc=$?"
  grep -E "^\[  (PASSED|FAILED) |Failure|seed|Expected|Which is|actual|error" $OUT/tests.log | head -60
fi
if [[ $MODE == all || $MODE == memcheck ]]; then
  timeout 150 compute-sanitizer --tool memcheck ./tmoe_cuda_tests --gtest_filter="${MEMCHECK_FILTER:-Grouped.PartialTilesFp32:Grouped.HadamardRotation:Sizes/GroupedTokens.MatchesReference/1}" > $OUT/memcheck.log 2>&1
  echo "memcheck rc=$?"; tail -6 $OUT/memcheck.log
fi
if [[ $MODE == all || $MODE == bench ]]; then
  TMOE_GROUPED_BENCH=1 TMOE_GROUPED_BENCH_CSV=$OUT/bench.csv timeout ${BENCH_TIMEOUT:-240} ./tmoe_cuda_tests --gtest_filter='GroupedBench.*' > $OUT/bench.log 2>&1
  echo "bench rc=$?"; grep -E "Failure|error|Expected" $OUT/bench.log | head; sed -n '/^shape /,$p' $OUT/bench.log
fi
if [[ $MODE == all || $MODE == profile ]]; then
  cuobjdump -sass ./tmoe_cuda_tests > $OUT/sass.txt 2>/dev/null; gzip -f $OUT/sass.txt
  TMOE_GROUPED_BENCH=1 TMOE_GROUPED_BENCH_SHAPES=mixtral-8x7b TMOE_GROUPED_BENCH_TOKENS=4096 timeout 150 \
    ncu --kernel-name-base mangled --kernel-name regex:${NCU_KERNEL:-Li2ELb0ELi256} --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats --section InstructionStats --section SchedulerStats \
    ./tmoe_cuda_tests --gtest_filter='GroupedBench.*' > $OUT/ncu.txt 2>&1
  echo "ncu rc=$?"; grep -E "Throughput|Duration|Stall|Warp Cycles|Issued|Occupancy|Registers|Eligible|Active Warps" $OUT/ncu.txt | head -40
fi
if [[ $MODE == all || $MODE == bench128 ]]; then
  TMOE_GROUPED_BENCH=1 TMOE_GROUPED_BENCH_TILE_ROWS=128 TMOE_GROUPED_BENCH_SHAPES=mixtral-8x7b,deepseek-v3 TMOE_GROUPED_BENCH_TOKENS=1024,4096,16384 \
    TMOE_GROUPED_BENCH_CSV=$OUT/bench128.csv timeout 120 ./tmoe_cuda_tests --gtest_filter='GroupedBench.*' > $OUT/bench128.log 2>&1
  echo "bench128 rc=$?"; sed -n '/^shape /,$p' $OUT/bench128.log | head -8
fi
