#!/usr/bin/env bash
# Training throughput of this checkout's build ("this") against an earlier commit's, alternated
# run by run on PTB (machines differ from run to run, so builds are only compared within one
# invocation): real tokens/s, median of each run's logging windows after the first, for
# `--preset ptb` in `--precision auto` and f32 and for the 512-wide recipe of the PTB table; with
# each run's loss at its last window, so that a change to what the step computes shows.
# Results in bench/results/ab-STAMP.{md,json}.
#
#   bench/ab.sh BASE_COMMIT [SECONDS] [ROUNDS] [CONFIGS]   (defaults 45 s, 3 rounds, all three:
#                                                           preset-auto,preset-f32,r512-auto)
#
# The earlier build is made in a worktree under target/ab-base (once; a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
base="${1:?usage: bench/ab.sh BASE_COMMIT [SECONDS] [ROUNDS] [CONFIGS]}"
seconds="${2:-45}"
rounds="${3:-3}"
configs="${4:-preset-auto,preset-f32,r512-auto}"
source bench/lib.sh
need_ptb ab.sh ptb.train.txt ptb.valid.txt
build_base "$base" target/ab-base
PYTHONWARNINGS=ignore "$TEXTVAE_VENV/bin/python" bench/ab.py "$ptb" \
  "$base=target/ab-base/target/release/textvae" "this=target/release/textvae" \
  --seconds "$seconds" --rounds "$rounds" --configs "$configs"
