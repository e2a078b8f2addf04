#!/usr/bin/env bash
# The Penn Treebank benchmark (REFERENCE.md §3, He et al. 2019's protocol): train on ptb.train.txt
# with ptb.valid.txt for validation and `--preset ptb` (word tokenizer, tied embeddings) under a
# wall-clock budget, then evaluate on ptb.test.txt with K importance samples, and write the
# results as markdown and JSON, and the training curves as PNG, under bench/results/.
#
#   bench/ptb.sh [MINUTES] [extra train flags...]     (MINUTES defaults to 60)
#
# PTB_DIR (default ../shared/corpora/ptb) is where the data is read from: PTB is never copied into
# the repository. IW_SAMPLES (default 500) sets K.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-60}"
shift || true
ptb="${PTB_DIR:-../shared/corpora/ptb}"
k="${IW_SAMPLES:-500}"
for f in ptb.train.txt ptb.valid.txt ptb.test.txt; do
  [ -f "$ptb/$f" ] || { echo "bench/ptb.sh: $ptb/$f not found (set PTB_DIR)" >&2; exit 1; }
done
scripts/setup
bin=target/release/textvae
stamp=$(date -u +%Y%m%dT%H%MZ)
model="checkpoints/ptb-bench-$stamp"
results="bench/results"
mkdir -p "$results"
start=$(date +%s)
$bin train "$ptb/ptb.train.txt" --valid "$ptb/ptb.valid.txt" --preset ptb \
  --max-minutes "$minutes" --out "$model" "$@"
train_secs=$(( $(date +%s) - start ))
start=$(date +%s)
$bin eval "$ptb/ptb.test.txt" --checkpoint "$model" --iw-samples "$k" --seed 1 --json > "$model/test.json"
eval_secs=$(( $(date +%s) - start ))
$bin plot --checkpoint "$model" -o "$results/ptb-$stamp.png" > /dev/null

python3 - "$model" "$results/ptb-$stamp" "$minutes" "$train_secs" "$eval_secs" "$*" <<'PY'
import json, os, platform, statistics, sys
model, out, minutes, train_secs, eval_secs, extra = sys.argv[1:]
test = json.load(open(os.path.join(model, "test.json")))
config = json.load(open(os.path.join(model, "config.json")))
state = json.load(open(os.path.join(model, "state.json")))
records = [json.loads(l) for l in open(os.path.join(model, "metrics.jsonl"))]
speeds = [r["tokens_per_sec"] for r in records if r["kind"] == "train"]
epochs = [r for r in records if r["kind"] == "epoch"]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
result = {
    "date": out.rsplit("-", 1)[-1],
    "machine": f"{cpu}, {os.cpu_count()} cores",
    "budget_minutes": float(minutes),
    "train_seconds": int(train_secs),
    "eval_seconds": int(eval_secs),
    "extra_flags": extra,
    "steps": state["step"],
    "epochs": state["epoch"],
    "tokens_per_sec_median": statistics.median(speeds) if speeds else None,
    "valid": epochs[-1] if epochs else None,
    "test": test,
    "config": config,
}
json.dump(result, open(out + ".json", "w"), indent=2)
t = test
md = f"""# PTB benchmark {result['date']}

Machine: {result['machine']}. Training budget {minutes} min ({result['steps']} steps, {result['epochs']} epochs,
median {result['tokens_per_sec_median']:.0f} tokens/s); test evaluation {eval_secs} s. Extra flags: `{extra or 'none'}`.
Training curves: [ptb-{result['date']}.png](ptb-{result['date']}.png).

| test set | NLL (IW, K={t['iw_samples']}) | PPL | KL | MI | AU | rec | ELBO |
|---|---|---|---|---|---|---|---|
| textvae | {t['nll']:.2f} | {t['ppl']:.2f} | {t['kl']:.2f} | {t['mi']:.2f} | {t['au']} | {t['rec']:.2f} | {t['elbo']:.2f} |
"""
open(out + ".md", "w").write(md)
print(md)
PY
