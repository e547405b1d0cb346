#!/usr/bin/env bash
# Testbed v2 on the GPU machine, in two calls of the device tool (each under its 10-minute limit):
#   bash benchmarks/testbed_v2_gpu.sh train     trains the model ($OUT/testbed_v2.tar: the checkpoint folder), then
#                                                scores it on $CHECK_CAPTIONS held-out captions per set (0: skip)
#   bash benchmarks/testbed_v2_gpu.sh measure   trains the Fréchet feature network, then guidance scan, realism
#                                                checks and the quality-vs-cost sweep (checkpoint: $CHECKPOINT,
#                                                default the shipped ditfa_jax/testbed/v2/checkpoint)
# Logs and results go under $OUT, folders as one tar each (the device tool brings back at most 8 files); the
# table is printed last.
set -euo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-outputs/testbed_v2_gpu}
mkdir -p "$OUT"
case "${1:-}" in
  train)
    rm -rf /tmp/testbed_v2
    python -m ditfa_jax.testbed.train --testbed v2 --out /tmp/testbed_v2 --steps 100000 \
      --time-limit-s "${TRAIN_SECONDS:-500}" --log-every 200 --data-workers "${DATA_WORKERS:-8}" \
      --steps-per-call "${STEPS_PER_CALL:-8}" ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train_log.txt" || rc=$?
    [ -d /tmp/testbed_v2 ] && tar -C /tmp -cf "$OUT/testbed_v2.tar" testbed_v2
    if [ -d /tmp/testbed_v2 ] && [ "${CHECK_CAPTIONS:-64}" != 0 ]; then  # a first look: fidelity and pictures
      rm -rf /tmp/check_v2
      python benchmarks/bench_testbed.py --testbed v2 --checkpoint /tmp/testbed_v2 --out-dir /tmp/check_v2 \
        --fidelity "${CHECK_CAPTIONS:-64}" 2>&1 | tee "$OUT/check_log.txt" || rc=$?
      tar -C /tmp -cf "$OUT/check_v2.tar" check_v2
    fi
    ;;
  measure)
    CHECKPOINT=${CHECKPOINT:-ditfa_jax/testbed/v2/checkpoint}
    FEATURES=${FEATURES:-}
    if [ -z "$FEATURES" ]; then
      rm -rf /tmp/features_v2
      python -m ditfa_jax.testbed.features --world v2 --out /tmp/features_v2 --steps 1500 --seed 0 \
        2>&1 | tee "$OUT/features_log.txt"
      tar -C /tmp -cf "$OUT/features_v2.tar" features_v2
      FEATURES=/tmp/features_v2
    fi
    rm -rf /tmp/bench_v2
    python benchmarks/bench_testbed.py --testbed v2 --checkpoint "$CHECKPOINT" --features "$FEATURES" \
      --out-dir /tmp/bench_v2 ${BENCH_ARGS:---guidance 1,2,3,4,6 --realism --sweep} 2>&1 | tee "$OUT/bench_log.txt" || rc=$?
    tar -C /tmp -cf "$OUT/bench_v2.tar" bench_v2
    ;;
  *)
    echo "usage: bash benchmarks/testbed_v2_gpu.sh train|measure" >&2
    exit 2
    ;;
esac
exit ${rc:-0}
