#!/usr/bin/env bash
# Importance-weighted evaluation on the PTB test set (wall time, sentences x samples/s, FLOP/s
# against the matmul throughput of the same run, peak RSS) and the peak RSS of training on PTB;
# results in bench/results/eval-STAMP.{md,json}.
#
#   bench/eval.sh [K] [SENTENCES]      (defaults 500 and the whole test set, 3,761 sentences)
#
# CHECKPOINT names a trained PTB model to evaluate; without it one is trained first
# (`--preset ptb`, one epoch, ~4 minutes on 2 cores). PTB_DIR (default ../shared/corpora/ptb).
# PRECISION (auto, f32 or bf16; default auto) is eval's --precision.
set -euo pipefail
cd "$(dirname "$0")/.."
k="${1:-500}"
sentences="${2:-}"
source bench/lib.sh
need_ptb eval.sh ptb.test.txt
args=(target/release/textvae "$ptb" --iw-samples "$k" --precision "${PRECISION:-auto}")
[ -n "$sentences" ] && args+=(--sentences "$sentences")
[ -n "${CHECKPOINT:-}" ] && args+=(--checkpoint "$CHECKPOINT")
PYTHONWARNINGS=ignore "$TEXTVAE_VENV/bin/python" bench/eval.py "${args[@]}"
