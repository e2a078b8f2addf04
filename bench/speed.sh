#!/usr/bin/env bash
# Training throughput on PTB: textvae against the same model written in PyTorch
# (bench/pytorch_vae.py, torch 2.13.0 from textvae's own venv), in alternation, with the float32
# matmul throughput of the same run; results in bench/results/speed-STAMP.{md,json}.
#
#   bench/speed.sh [SECONDS] [ROUNDS] [extra speed.py flags...]   (defaults 45 s, 3 rounds)
#
# e.g. `bench/speed.sh 30 3 --models default --precisions f32,bf16` adds rows with the output
# layer in bfloat16 on both sides (textvae --precision bf16, the script under torch.autocast).
#
# PTB_DIR (default ../shared/corpora/ptb) is where PTB is read from. Run it on an otherwise idle
# machine: the two programs share nothing but the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-45}"
rounds="${2:-3}"
shift 2 || shift $# || true
source bench/lib.sh
need_ptb speed.sh ptb.train.txt ptb.valid.txt
PYTHONWARNINGS=ignore "$TEXTVAE_VENV/bin/python" bench/speed.py target/release/textvae "$ptb" \
  --seconds "$seconds" --rounds "$rounds" "$@"
