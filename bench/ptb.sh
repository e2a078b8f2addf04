#!/usr/bin/env bash
# The Penn Treebank benchmark (REFERENCE.md §3, He et al. 2019's protocol): train on ptb.train.txt
# with ptb.valid.txt for validation and `--preset ptb` (word tokenizer, tied embeddings) under a
# wall-clock budget, then evaluate on ptb.test.txt with K importance samples, and write the
# results as markdown and JSON, and the training curves as PNG, under bench/results/.
#
#   bench/ptb.sh [MINUTES] [extra train flags...]     (MINUTES defaults to 60)
#
# PTB_DIR (default ../shared/corpora/ptb) is where the data is read from: PTB is never copied into
# the repository. IW_SAMPLES (default 500) sets K; TEST_SENTENCES evaluates that many test
# sentences, evenly spaced, instead of all 3,761; NAME (default ptb) prefixes the result files;
# PRESET (default ptb; ptb-wide is the 512-wide recipe of the README's best row) is the starting
# configuration the flags are laid over.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-60}"
shift || true
ptb="${PTB_DIR:-../shared/corpora/ptb}"
k="${IW_SAMPLES:-500}"
name="${NAME:-ptb}"
preset="${PRESET:-ptb}"
subset=()
[ -n "${TEST_SENTENCES:-}" ] && subset=(--sentences "$TEST_SENTENCES")
for f in ptb.train.txt ptb.valid.txt ptb.test.txt; do
  [ -f "$ptb/$f" ] || { echo "bench/ptb.sh: $ptb/$f not found (set PTB_DIR)" >&2; exit 1; }
done
scripts/setup
bin=target/release/textvae
stamp=$(date -u +%Y%m%dT%H%MZ)
model="checkpoints/$name-bench-$stamp"
results="bench/results"
mkdir -p "$results"
# Peak RSS of training and of the evaluation, by GNU time where the machine has it.
rss=$(mktemp -d)
trap 'rm -rf "$rss"' EXIT
measured() { # NAME COMMAND...
  local name=$1; shift
  if [ -x /usr/bin/time ]; then /usr/bin/time -f %M -o "$rss/$name" "$@"; else "$@"; fi
}
start=$(date +%s)
measured train $bin train "$ptb/ptb.train.txt" --valid "$ptb/ptb.valid.txt" --preset "$preset" \
  --max-minutes "$minutes" --out "$model" "$@"
train_secs=$(( $(date +%s) - start ))
start=$(date +%s)
measured eval $bin eval "$ptb/ptb.test.txt" --checkpoint "$model" --iw-samples "$k" --seed 1 \
  --json "${subset[@]}" > "$model/test.json"
eval_secs=$(( $(date +%s) - start ))
for f in train eval; do tail -n 1 "$rss/$f" 2>/dev/null > "$model/$f.rss_kib" || true; done
$bin plot --checkpoint "$model" -o "$results/$name-$stamp.png" > /dev/null
# What a user sees of z: greedy reconstructions of every 500th test sentence, and two walks.
m=(--checkpoint "$model" --seed 1)
awk 'NR % 500 == 1' "$ptb/ptb.test.txt" | sed 's/^ *//; s/ *$//' > "$model/shown.txt"
$bin reconstruct "$model/shown.txt" "${m[@]}" > "$model/reconstructions.tsv"
printf '%s\t%s\n' "no it was n't black monday" "i made a similar line and i produced it cheaper he says" \
  "companies added capacity <unk>" "a good bet would be the tension between blacks and <unk> in new york city" \
  > "$model/pairs.tsv"
$bin interpolate --pairs "$model/pairs.tsv" --steps 8 "${m[@]}" > "$model/interpolations.txt"

python3 - "$model" "$results/$name-$stamp" "$minutes" "$train_secs" "$eval_secs" "$*" "$preset" <<'PY'
import json, os, platform, statistics, sys
model, out, minutes, train_secs, eval_secs, extra, preset = sys.argv[1:]
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
    "preset": preset,
    "extra_flags": extra,
    "steps": state["step"],
    "epochs": state["epoch"],
    "tokens_per_sec_median": statistics.median(speeds) if speeds else None,
    "valid": epochs[-1] if epochs else None,
    "test": test,
    "config": config,
}
def rss_mib(name):
    try:
        return int(open(os.path.join(model, name + ".rss_kib")).read()) / 1024
    except (OSError, ValueError):
        return None
result["train_peak_rss_mib"], result["eval_peak_rss_mib"] = rss_mib("train"), rss_mib("eval")
json.dump(result, open(out + ".json", "w"), indent=2)
t = test
md = f"""# PTB benchmark {result['date']}

Machine: {result['machine']}. Training budget {minutes} min ({result['steps']} steps, {result['epochs']} epochs,
median {result['tokens_per_sec_median']:.0f} tokens/s); test evaluation {eval_secs} s. `--preset {preset}`, extra flags: `{extra or 'none'}`.
Peak RSS: training {result['train_peak_rss_mib'] or float('nan'):.0f} MiB, evaluation {result['eval_peak_rss_mib'] or float('nan'):.0f} MiB.
Training curves: [{os.path.basename(out)}.png]({os.path.basename(out)}.png).

| test set | NLL (IW, K={t['iw_samples']}) | PPL | KL (to N(0, I)) | MI | AU | rec | ELBO | token accuracy | exact match | BLEU-4 |
|---|---|---|---|---|---|---|---|---|---|---|
| textvae ({t['sentences']} sentences) | {t['nll']:.2f} | {t['ppl']:.2f} | {t['kl']:.2f} ({t.get('kl_normal', t['kl']):.2f}) | {t['mi']:.2f} | {t['au']} | {t['rec']:.2f} | {t['elbo']:.2f} | {t['rec_acc']:.3f} | {t['rec_exact']:.3f} | {t['rec_bleu']:.1f} |
"""
recs = [l.rstrip("\n").split("\t") for l in open(os.path.join(model, "reconstructions.tsv"))]
walks = open(os.path.join(model, "interpolations.txt")).read().strip().split("\n\n")
result["interpolation_distinct_lines"] = [len(set(w.splitlines())) for w in walks]
json.dump(result, open(out + ".json", "w"), indent=2)
md += "\nGreedy reconstructions (every 500th test sentence):\n\n| input | reconstruction |\n|---|---|\n"
md += "".join(f"| {a} | {b} |\n" for a, b in recs)
md += f"\nInterpolations (`--steps 8`, greedy; distinct lines: {result['interpolation_distinct_lines']}):\n\n```\n"
md += "\n\n".join(walks) + "\n```\n"
open(out + ".md", "w").write(md)
print(md)
PY
