#!/usr/bin/env bash
# Time to quality on PTB: `--preset ptb` of a baseline commit (default 2892887, issue 10's
# "today") for BASE_MINUTES, then of this checkout for MINUTES, one after the other on this
# machine; the validation -ELBO and KL each reached, from their metrics. Machines differ from
# run to run, so the comparison is only within one invocation.
# Results in bench/results/ttq-STAMP.{md,json}.
#
#   bench/ttq.sh [MINUTES] [BASE_MINUTES] [BASE_COMMIT]     (defaults 10, 20, 2892887)
#
# The baseline is built in a worktree under target/ttq-base (once; a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-10}"
base_minutes="${2:-20}"
base="${3:-2892887}"
source bench/lib.sh
need_ptb ttq.sh ptb.train.txt ptb.valid.txt
wt="target/ttq-base"
build_base "$base" "$wt"
stamp=$(date -u +%Y%m%dT%H%MZ)
runs="checkpoints/ttq-$stamp"
mkdir -p "$runs"
train() { # BINARY OUT MINUTES
  "$1" train "$ptb/ptb.train.txt" --valid "$ptb/ptb.valid.txt" --preset ptb \
    --max-minutes "$3" --out "$2" 2> "$2.log" > /dev/null
}
train "$wt/target/release/textvae" "$runs/base" "$base_minutes"
train target/release/textvae "$runs/new" "$minutes"
python3 - "$runs" "$base" "$base_minutes" "$minutes" "bench/results/ttq-$stamp" <<'PY'
import json, os, platform, statistics, sys
runs, base, base_minutes, minutes, out = sys.argv[1:]
def curve(d):
    recs = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
    epochs = [r for r in recs if r["kind"] == "epoch"]
    speed = [r["tokens_per_sec"] for r in recs if r["kind"] == "train"]
    return [dict(minutes=r["elapsed_secs"] / 60, elbo=r["valid_elbo"], kl=r["valid_kl"])
            for r in epochs], statistics.median(speed)
b, b_speed = curve(os.path.join(runs, "base"))
n, n_speed = curve(os.path.join(runs, "new"))
target = b[-1]
reached = next((p for p in n if p["elbo"] <= target["elbo"]), None)
# Issue 10 asks for the figure "with KL no lower": the first epoch that has both.
reached_kl = next((p for p in n if p["elbo"] <= target["elbo"] and p["kl"] >= target["kl"]), None)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
            if l.startswith("model name")), platform.processor())
res = dict(date=out.rsplit("-", 1)[-1], machine=f"{cpu}, {os.cpu_count()} cores",
           base_commit=base, base_minutes=float(base_minutes), minutes=float(minutes),
           base=b, new=n, base_tokens_per_sec=b_speed, new_tokens_per_sec=n_speed,
           target=target, reached=reached, reached_with_kl_no_lower=reached_kl)
json.dump(res, open(out + ".json", "w"), indent=2)
fmt = lambda ps: "; ".join(f"{p['minutes']:.1f} min: {p['elbo']:.2f} (KL {p['kl']:.2f})" for p in ps)
md = [f"# Time to quality on PTB, {res['date']}", "",
      f"{res['machine']}; `--preset ptb`, validation -ELBO (nats/sentence) at each epoch end.", "",
      f"- baseline {base}, {base_minutes} min, {b_speed:.0f} tokens/s: {fmt(b)}",
      f"- this build, {minutes} min, {n_speed:.0f} tokens/s: {fmt(n)}", "",
      f"Target (the baseline's last figure): {target['elbo']:.2f} at KL {target['kl']:.2f}. " +
      (f"Reached after {reached['minutes']:.1f} min, KL {reached['kl']:.2f}." if reached
       else f"Not reached in {minutes} min; closest {min(p['elbo'] for p in n):.2f}.") +
      (f" With KL no lower: after {reached_kl['minutes']:.1f} min ({reached_kl['elbo']:.2f}, "
       f"KL {reached_kl['kl']:.2f})." if reached_kl
       else " Never with KL no lower." if reached else "")]
open(out + ".md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
