#!/usr/bin/env bash
# Generation speed: wall time of `textvae generate -n N` (process start and model load included)
# by sampling, top-p sampling, greedy decoding and beam search (K = 5), the median of 3 runs each, from CHECKPOINT
# (default: the newest checkpoints/ptb-bench-* that bench/ptb.sh left, a 10k-word PTB model).
# Results in bench/results/generate-STAMP.{md,json}.
#
#   bench/generate.sh [CHECKPOINT] [N]      (N defaults to 1000)
set -euo pipefail
cd "$(dirname "$0")/.."
ckpt="${1:-$(ls -d checkpoints/ptb-bench-* 2>/dev/null | tail -1)}"
n="${2:-1000}"
[ -n "$ckpt" ] && [ -f "$ckpt/config.json" ] || {
  echo "bench/generate.sh: no checkpoint (give one, or run bench/ptb.sh first)" >&2; exit 1; }
scripts/setup
stamp=$(date -u +%Y%m%dT%H%MZ)
out="bench/results/generate-$stamp"
python3 - "$ckpt" "$n" "$out" <<'PY'
import json, os, platform, statistics, subprocess, sys, time
ckpt, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ROUNDS = 3  # the median of three runs: one run is at the mercy of the machine's neighbours
start = time.perf_counter()
subprocess.run(["target/release/textvae", "--version"], check=True, capture_output=True)
startup = time.perf_counter() - start
modes = {"sampling (temperature 1)": [], "top-p 0.9": ["--top-p", "0.9"],
         "greedy": ["--greedy"], "beam 5": ["--beam", "5"]}
rows = []
for name, flags in modes.items():
    cmd = ["target/release/textvae", "generate", "-n", str(n), "--seed", "1",
           "--checkpoint", ckpt] + flags
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        lines = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()
        times.append(time.perf_counter() - start)
    secs = statistics.median(times)
    words = sum(len(l.split()) for l in lines)
    rows.append(dict(mode=name, flags=" ".join(flags), seconds=secs, rounds=times, sentences=len(lines),
                     sentences_per_sec=len(lines) / secs, mean_words=words / max(len(lines), 1)))
cfg = json.load(open(os.path.join(ckpt, "config.json")))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
            if l.startswith("model name")), platform.processor())
result = dict(date=out.rsplit("-", 1)[-1], machine=f"{cpu}, {os.cpu_count()} cores",
              checkpoint=ckpt, vocab=cfg["model"]["vocab_size"], n=n, startup_seconds=startup,
              rows=rows)
json.dump(result, open(out + ".json", "w"), indent=2)
md = [f"# Generation, {result['date']}", "",
      f"{result['machine']}; `{ckpt}` (vocabulary {result['vocab']}); `generate -n {n}`, "
      "wall time with process start and model load (median of 3 runs; "
      f"`textvae --version` alone: {startup:.2f} s).", "",
      "| decoding | seconds | sentences/s | mean words |", "|---|---|---|---|"]
md += [f"| {r['mode']} | {r['seconds']:.2f} | {r['sentences_per_sec']:.0f} | {r['mean_words']:.1f} |"
       for r in rows]
open(out + ".md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
