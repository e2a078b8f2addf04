#!/usr/bin/env bash
# The data path on a corpus of about a million sentences: the shared English, Chinese and PTB
# training sentences concatenated and repeated until there are LINES of them (default 1,000,000).
# Tokenizer training, then reading + tokenising + batching, in seconds and peak RSS; results in
# bench/results/data-STAMP.{md,json}.
#
#   bench/data.sh [LINES]
set -euo pipefail
cd "$(dirname "$0")/.."
lines="${1:-1000000}"
shared="${SHARED_CORPORA:-../shared/corpora}"
sources=("$shared"/en/*.txt "$shared"/zh/*.txt "$shared"/ptb/ptb.train.txt)
[ -f "${sources[0]}" ] || { echo "bench/data.sh: no corpora under $shared (set SHARED_CORPORA)" >&2; exit 1; }
scripts/setup
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
touch "$tmp/big.txt"
while [ "$(wc -l < "$tmp/big.txt")" -lt "$lines" ]; do
  cat "${sources[@]}" >> "$tmp/big.txt"
done
head -n "$lines" "$tmp/big.txt" > "$tmp/corpus.txt"
rm "$tmp/big.txt"
python3 bench/data.py target/release/textvae "$tmp/corpus.txt"
