#!/bin/bash
# Device-side driver for the grouped engineer's runs: tests, memcheck, benchmarks, ncu, for each
# test binary named on the command line (tmoe_cuda_tests built with -DTMOE_CUDA_ARCHITECTURES=90).
# Usage (device): bash run.sh BINARY [BINARY...]; results under $OUT/<binary>.*
cd "$(dirname "$0")"
CUBLAS_DIR=$(dirname "$(find /usr/local/cuda* /opt /usr/lib -name 'libcublas.so.1*' 2>/dev/null | head -1)")
export LD_LIBRARY_PATH=$PWD/lib:$CUBLAS_DIR:$LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
for BIN in "$@"; do
  echo "=== $BIN"; ldd ./$BIN | grep "not found"
  timeout 200 ./$BIN --gtest_filter='*Grouped*:-GroupedBench.*' > $OUT/$BIN.tests.log 2>&1
  echo "tests rc=$?"; grep -E "^\[  (PASSED|FAILED) |Failure|seed|Expected|Which is|actual" $OUT/$BIN.tests.log | head -30
  timeout 150 compute-sanitizer --tool memcheck ./$BIN --gtest_filter='Heights/GroupedTileRows.PartialTiles/*:Grouped.HadamardRotation:Sizes/GroupedTokens.MatchesReference/1' > $OUT/$BIN.memcheck.log 2>&1
  echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|PASSED|FAILED" $OUT/$BIN.memcheck.log | head -5
  TMOE_GROUPED_BENCH=1 timeout 150 ./$BIN --gtest_filter='GroupedBench.*' > $OUT/$BIN.bench.log 2>&1
  echo "bench rc=$?"; sed -n '/^shape /,/^\[/p' $OUT/$BIN.bench.log
done
BIN=$1
TMOE_GROUPED_BENCH=1 TMOE_GROUPED_BENCH_TILE_ROWS=128 TMOE_GROUPED_BENCH_SHAPES=mixtral-8x7b,deepseek-v3 TMOE_GROUPED_BENCH_TOKENS=1024,4096,16384 \
  timeout 100 ./$BIN --gtest_filter='GroupedBench.*' > $OUT/bench128.log 2>&1
echo "bench tile_rows=128 ($BIN) rc=$?"; sed -n '/^shape /,/^\[/p' $OUT/bench128.log
TMOE_GROUPED_BENCH=1 TMOE_GROUPED_BENCH_SHAPES=mixtral-8x7b TMOE_GROUPED_BENCH_TOKENS=4096 timeout 120 \
  ncu --kernel-name-base mangled --kernel-name regex:Li2ELb0ELi256 --launch-count 1 \
  --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis --section Occupancy \
  --section LaunchStats --section InstructionStats --section SchedulerStats \
  ./$BIN --gtest_filter='GroupedBench.*' > $OUT/ncu.txt 2>&1
echo "ncu rc=$?"; grep -E "Duration|Issue Slots|Issued Ipc|Warp Cycles Per Issued|Achieved Active|Dynamic Shared" $OUT/ncu.txt | head
