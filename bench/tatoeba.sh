#!/usr/bin/env bash
# Does z carry the sentence? Trains `textvae train` (defaults, or the flags given) on the English
# Tatoeba sentences less every 89th line (the file is sorted by length, so `awk 'NR % 89'` holds
# out 310 sentences of every length), for MINUTES on this machine; then, on the unseen
# sentences: `eval` with K importance samples (NLL, KL, MI, AU, greedy reconstruction accuracy,
# exact match, BLEU-4), the same reconstruction scores with codes refined by `--refine 30` and
# with beam search (`--beam 5`), two interpolations and walks between 50 seeded pairs. Writes
# markdown and JSON under bench/results/.
#
#   bench/tatoeba.sh [MINUTES] [train flags...]     (MINUTES defaults to 10)
#
# TATOEBA (default corpora/tatoeba_eng.txt, the shared file's copy) is the corpus; IW_SAMPLES (default 50)
# sets K; NAME (default tatoeba) prefixes the result files; TRAIN_EVERY=N (default 1) trains on every
# Nth of the training lines only, against the same unseen ones (how reconstruction grows with data).
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-10}"
shift || true
corpus="${TATOEBA:-corpora/tatoeba_eng.txt}"
k="${IW_SAMPLES:-50}"
name="${NAME:-tatoeba}"
every="${TRAIN_EVERY:-1}"
[ -f "$corpus" ] || { echo "bench/tatoeba.sh: $corpus not found (set TATOEBA)" >&2; exit 1; }
[[ "$every" =~ ^[1-9][0-9]*$ ]] || { echo "bench/tatoeba.sh: TRAIN_EVERY must be a whole number from 1" >&2; exit 1; }
scripts/setup
bin=$PWD/target/release/textvae
stamp=$(date -u +%Y%m%dT%H%MZ)
work="checkpoints/$name-bench-$stamp"
mkdir -p "$work" bench/results
# The corpus starts with a byte-order mark; the reader strips it.
awk 'NR % 89' "$corpus" | awk -v n="$every" '(NR - 1) % n == 0' > "$work/train.txt"
awk 'NR % 89 == 0' "$corpus" > "$work/unseen.txt"
start=$(date +%s)
$bin train "$work/train.txt" --out "$work/model" --max-minutes "$minutes" "$@"
train_secs=$(( $(date +%s) - start ))
m=(--checkpoint "$work/model" --seed 1)
$bin eval "$work/unseen.txt" "${m[@]}" --iw-samples "$k" --json > "$work/unseen.json"
$bin reconstruct "$work/unseen.txt" "${m[@]}" > "$work/reconstructions.tsv"
# The same with each code refined by 30 gradient steps (reconstruct --refine): what the encoder misses.
$bin reconstruct "$work/unseen.txt" "${m[@]}" --refine 30 --score \
  > "$work/reconstructions-refined.tsv" 2> "$work/refined-score.txt"
# And with beam search in place of greedy decoding: what a user who asks for it gets.
$bin reconstruct "$work/unseen.txt" "${m[@]}" --beam 5 --score \
  > "$work/reconstructions-beam.tsv" 2> "$work/beam-score.txt"
# One pair says little about walks in general: 50 pairs of unseen sentences, drawn with a fixed seed.
python3 -c '
import random, sys
lines = [l.strip() for l in open(sys.argv[1]) if l.strip()]
rng = random.Random(0)
for _ in range(50):
    print("\t".join(rng.sample(lines, 2)))
' "$work/unseen.txt" > "$work/pairs.tsv"
$bin interpolate --pairs "$work/pairs.tsv" --steps 8 "${m[@]}" > "$work/walks.txt"
# Two walks to read: issue 9's pairs on English Tatoeba, else the first two seeded pairs (English
# sentences would say nothing about a model of another language).
if [ "$(basename "$corpus")" = tatoeba_eng.txt ]; then
  printf '%s\t%s\n' "Grab Tom." "I'm sober." \
    "Tom has known Mary since childhood." "Where is the nearest bank?" > "$work/examples.tsv"
else
  head -n 2 "$work/pairs.tsv" > "$work/examples.tsv"
fi
$bin interpolate --pairs "$work/examples.tsv" --steps 8 "${m[@]}" > "$work/interpolations.txt"
python3 - "$work" "bench/results/$name-$stamp" "$minutes" "$train_secs" "$*" "$(basename "$corpus")" "$every" <<'PY'
import json, os, re, statistics, sys
work, out, minutes, train_secs, extra, corpus, every = sys.argv[1:]
train_lines = sum(1 for l in open(os.path.join(work, "train.txt")) if l.strip())
model = os.path.join(work, "model")
t = json.load(open(os.path.join(work, "unseen.json")))
state = json.load(open(os.path.join(model, "state.json")))
records = [json.loads(l) for l in open(os.path.join(model, "metrics.jsonl"))]
speeds = [r["tokens_per_sec"] for r in records if r["kind"] == "train"]
walks = open(os.path.join(work, "interpolations.txt")).read().strip().split("\n\n")
distinct = [len(set(w.splitlines())) for w in walks]
many = [len(set(w.splitlines())) for w in open(os.path.join(work, "walks.txt")).read().strip().split("\n\n")]
walk_stats = {"pairs": len(many), "mean_distinct": sum(many) / len(many),
              "share_at_least_7": sum(d >= 7 for d in many) / len(many)}
recs = [l.rstrip("\n").split("\t") for l in open(os.path.join(work, "reconstructions.tsv"))]
def scores(name):
    # "score: token accuracy A, exact match E, BLEU-4 B over ..."
    line = next(l for l in open(os.path.join(work, name)) if l.startswith("score:"))
    return (float(x) for x in re.findall(r"(?:accuracy|match|BLEU-4) ([0-9.]+)", line))
acc, exact, bleu = scores("refined-score.txt")
refined = {"refine_steps": 30, "rec_acc": acc, "rec_exact": exact, "rec_bleu": bleu}
b_acc, b_exact, b_bleu = scores("beam-score.txt")
beam = {"beam": 5, "rec_acc": b_acc, "rec_exact": b_exact, "rec_bleu": b_bleu}
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
result = {
    "date": out.rsplit("-", 1)[-1], "corpus": corpus, "machine": f"{cpu}, {os.cpu_count()} cores",
    "budget_minutes": float(minutes), "train_seconds": int(train_secs), "train_flags": extra,
    "train_lines": train_lines, "train_every": int(every),
    "steps": state["step"], "epochs": state["epoch"],
    "tokens_per_sec_median": statistics.median(speeds) if speeds else None,
    "unseen": t, "unseen_refined": refined, "unseen_beam": beam, "interpolation_distinct_lines": distinct, "walks": walk_stats,
    "config": json.load(open(os.path.join(model, "config.json"))),
}
json.dump(result, open(out + ".json", "w"), indent=2)
sample = "\n".join(f"| {a} | {b} |" for a, b in recs[::31])
md = f"""# Reconstruction benchmark on {corpus}, {result['date']}

Machine: {result['machine']}. `textvae train` {('`' + extra + '`') if extra else 'with no flags'}, {minutes} min
({result['steps']} steps, {result['epochs']} epochs, median {result['tokens_per_sec_median']:.0f} tokens/s)
on {train_lines} training lines{f' (one in {every} of the training split)' if every != '1' else ''}.
{t['sentences']} unseen sentences (every 89th line of {corpus}):

| NLL (IW, K={t['iw_samples']}) | KL (to N(0, I)) | MI | AU | rec | ELBO | token accuracy | exact match | BLEU-4 |
|---|---|---|---|---|---|---|---|---|
| {t['nll']:.2f} | {t['kl']:.2f} ({t.get('kl_normal', t['kl']):.2f}) | {t['mi']:.2f} | {t['au']} | {t['rec']:.2f} | {t['elbo']:.2f} | {t['rec_acc']:.3f} | {t['rec_exact']:.3f} | {t['rec_bleu']:.1f} |

With each code refined by 30 gradient steps first (`reconstruct --refine 30`): token accuracy
{acc:.3f}, exact match {exact:.3f}, BLEU-4 {bleu:.1f}. With beam search (`reconstruct --beam 5`):
token accuracy {b_acc:.3f}, exact match {b_exact:.3f}, BLEU-4 {b_bleu:.1f}.

Greedy reconstructions (every 31st unseen sentence):

| input | reconstruction |
|---|---|
{sample}

Walks between 50 pairs of unseen sentences (seeded; `--steps 8`, at most 10 lines each, spread over the sentences met along the path): on average
{walk_stats['mean_distinct']:.2f} distinct lines, {walk_stats['share_at_least_7']:.0%} of walks with at least 7.

Interpolations (`--steps 8`, greedy; distinct lines: {distinct}):

```
{chr(10).join(walks[0].splitlines())}

{chr(10).join(walks[1].splitlines())}
```
"""
open(out + ".md", "w").write(md)
print(md)
PY
