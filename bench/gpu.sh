#!/usr/bin/env bash
# The CUDA path, checked and timed on a machine with an NVIDIA GPU: `textvae info`, every
# subcommand once with --device cuda, then training throughput on PTB at several batch sizes
# against bench/pytorch_vae.py on the same GPU, IW evaluation (K = 500, the whole PTB test set)
# and generation. Each step runs on its own: one that fails is reported and the rest go on.
#
#   bench/gpu.sh [SECONDS] [BATCH_SIZES]        (defaults 20 s per run, "32 128 512")
#
# TEXTVAE: the binary (default target/release/textvae); PYTHON: a python3 with a CUDA torch for
# the PyTorch side (default python3); PTB_DIR as for the other benches; RESULTS: where the log and
# the summary go (default bench/results/gpu-STAMP.{log,md}).
#
# A GPU machine whose PyTorch is not 2.13 needs a binary built against its libtorch: the tch
# release for that version (0.24 for 2.11) in Cargo.toml, LIBTORCH=<its torch dir> at build time,
# and LD_LIBRARY_PATH=<its torch/lib> at run time; the source compiles unchanged (done for the
# results of 2026-11-26 and 2026-11-27: H100 and H200, torch 2.11.0+cu130).
set -uo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-20}"
batch_sizes="${2:-32 128 512}"
tv="${TEXTVAE:-target/release/textvae}"
py="${PYTHON:-python3}"
# DEVICE=cpu, SMOKE_CORPUS=corpora/tiny.txt and EVAL_K=5 check the script itself on a CPU.
dev="${DEVICE:-cuda}"
smoke="${SMOKE_CORPUS:-corpora/mobydick_sentences.txt}"
eval_k="${EVAL_K:-500}"
source bench/lib.sh
find_ptb gpu.sh ptb.train.txt ptb.valid.txt ptb.test.txt
stamp=$(date -u +%Y%m%dT%H%MZ)
results="${RESULTS:-bench/results}/gpu-$stamp"
mkdir -p "$(dirname "$results")"
tmp=$(mktemp -d)
log="$results.log"
md="$results.md"
exec 3>&1 >"$log" 2>&1

say() { echo "$*" | tee -a "$md" >&3; }
step() { # NAME CMD... : runs CMD, logs its output, says ok/failed with the wall time
  local name=$1 start rc
  shift
  echo "== $name: $*"
  start=$(date +%s%N)
  "$@"
  rc=$?
  local ms=$((($(date +%s%N) - start) / 1000000))
  if [ $rc -eq 0 ]; then
    say "- $name: ok ($((ms / 1000)).$((ms % 1000 / 100)) s)"
  else
    say "- $name: FAILED, exit $rc"
  fi
  return $rc
}
median_speed() { # metrics.jsonl -> median tokens/s of the training windows after the first
  "$py" -c 'import json,statistics,sys
r=[json.loads(l) for l in open(sys.argv[1])]
s=[x["tokens_per_sec"] for x in r if x["kind"]=="train"][1:]
print(f"{statistics.median(s):.0f}" if s else "n/a")' "$1"
}

say "# textvae on a GPU, $stamp"
say ""
say "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1); $(nproc) CPU cores; torch for PyTorch: $("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
say ""
say '```'
"$tv" info 2>&1 | tee -a "$md" >&3
say '```'
say ""
say "## Every subcommand with --device $dev ($smoke, 1 epoch)"
ck="$tmp/smoke"
a="Call me Ishmael."
b="The sea was calm and the ship sailed on."
step train "$tv" train "$smoke" --out "$ck" --epochs 1 --batch-size 16 --device $dev
step train-bf16 "$tv" train "$smoke" --out "$tmp/smoke16" --epochs 1 --batch-size 16 \
  --precision bf16 --device $dev
# A learning rate that overflows: each step is skipped on the device, and the run stops with an
# error once --max-nonfinite of them come in a row.
step "non-finite steps stop the run" sh -c "'$tv' train '$smoke' --out '$tmp/nf' --epochs 3 \
  --batch-size 4 --lr 1e30 --max-nonfinite 3 --log-every 1 --device $dev 2>'$tmp/nf.log'
  test \$? -ne 0 && grep 'steps in a row' '$tmp/nf.log'"
step generate "$tv" generate --checkpoint "$ck" -n 5 --seed 1 --device $dev
step generate-beam "$tv" generate --checkpoint "$ck" -n 5 --beam 5 --seed 1 --device $dev
step reconstruct sh -c "printf '%s\n%s\n' '$a' '$b' | '$tv' reconstruct --checkpoint '$ck' --device $dev"
step interpolate "$tv" interpolate --checkpoint "$ck" "$a" "$b" --steps 6 --device $dev
step encode sh -c "printf '%s\n%s\n' '$a' '$b' | '$tv' encode --checkpoint '$ck' --device $dev"
step eval "$tv" eval --checkpoint "$ck" "$ck/heldout.txt" --iw-samples 50 --device $dev
step resume "$tv" train "$smoke" --out "$ck" --epochs 2 --batch-size 16 --resume --device $dev
# The same model on the CPU and the GPU: the evaluation of one checkpoint should agree closely.
for d in cpu $dev; do
  "$tv" eval --checkpoint "$ck" "$ck/heldout.txt" --iw-samples 1 --sentences 200 --seed 1 \
    --device $d --json >"$tmp/eval-$d.json" 2>/dev/null
done
say "- eval K=1 on 200 held-out sentences, cpu vs $dev: $(tr -d '\n' <"$tmp/eval-cpu.json" | head -c 300) | $(tr -d '\n' <"$tmp/eval-$dev.json" | head -c 300)"

say ""
say "## Training throughput on PTB (--preset ptb, real tokens/s, median of 25-step windows, ${seconds} s each)"
say ""
say "textvae in float32 and with \`--precision bf16\`; bench/pytorch_vae.py --device $dev with"
say "torch.optim.Adam's default (foreach) step, with \`--fused-adam\`, and with both and \`--bf16\`."
say "Ratios: textvae f32 / PyTorch fused, textvae bf16 / PyTorch fused bf16."
say ""
say "| batch | textvae f32 | textvae bf16 | PyTorch | PyTorch fused | PyTorch fused bf16 | ratio f32 | ratio bf16 |"
say "|---|---|---|---|---|---|---|---|"
head -100 "$ptb/ptb.valid.txt" >"$tmp/valid100.txt"
textvae_speed() { # BATCH PRECISION -> median tokens/s (the model stays in $tmp/ptb-BATCH-PRECISION)
  local out="$tmp/ptb-$1-$2"
  "$tv" train "$ptb/ptb.train.txt" --valid "$tmp/valid100.txt" --preset ptb --device $dev \
    --batch-size "$1" --precision "$2" --max-minutes "$(awk "BEGIN { print $seconds / 60 }")" \
    --log-every 25 --save-every 0 --out "$out" >&2
  median_speed "$out/metrics.jsonl" 2>/dev/null || echo n/a
}
pytorch_speed() { # BATCH FLAGS... -> median tokens/s
  local bs=$1
  shift
  "$py" bench/pytorch_vae.py "$ptb/ptb.train.txt" --seconds "$seconds" --tie --conv-filters 128 \
    --batch-size "$bs" --device $dev --threads "$(nproc)" "$@" |
    tail -1 | "$py" -c 'import json,sys; print("%.0f" % json.load(sys.stdin)["window_median"])' ||
    echo n/a
}
ratio() { "$py" -c "print(f'{$1 / $2:.2f}')" 2>/dev/null || echo n/a; }
for bs in $batch_sizes; do
  t32=$(textvae_speed "$bs" f32)
  t16=$(textvae_speed "$bs" bf16)
  p=$(pytorch_speed "$bs")
  pf=$(pytorch_speed "$bs" --fused-adam)
  pf16=$(pytorch_speed "$bs" --fused-adam --bf16)
  say "| $bs | $t32 | $t16 | $p | $pf | $pf16 | $(ratio "$t32" "$pf") | $(ratio "$t16" "$pf16") |"
done

say ""
say "## Evaluation and generation (the batch-128 model above)"
ck="$tmp/ptb-128-f32"
[ -d "$ck" ] || ck="$tmp/ptb-$(echo $batch_sizes | cut -d' ' -f1)-f32"
for prec in f32 bf16; do
  step "eval K=$eval_k --precision $prec, PTB test (3,761 sentences)" sh -c "timeout 240 '$tv' eval \
    --checkpoint '$ck' '$ptb/ptb.test.txt' --iw-samples $eval_k --precision $prec --device $dev \
    --json >'$tmp/eval-$prec.json'"
  say "  $(tr -d '\n' <"$tmp/eval-$prec.json" | head -c 400)"
done
step "generate -n 1000" sh -c "'$tv' generate --checkpoint '$ck' -n 1000 --seed 1 --device $dev >'$tmp/gen.txt'"
step "generate -n 1000 --beam 5" sh -c "'$tv' generate --checkpoint '$ck' -n 1000 --beam 5 --seed 1 --device $dev >'$tmp/beam.txt'"
say ""
say "Log: $log"
rm -rf "$tmp"
