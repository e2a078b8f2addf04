#!/usr/bin/env python3
"""What a reconstruction keeps, with and without its position: for the run directories that
bench/tatoeba.sh leaves under checkpoints/ (train.txt and reconstructions.tsv), each input unit
(a word, or a character for text without spaces) counts as kept position-wise when the
reconstruction has it at the same place, as textvae's token accuracy counts tokens, and as kept
in order when it lies in a longest matching alignment of the two (difflib's matching blocks), so
that one inserted or dropped unit early in a sentence does not cost the rest. Both are broken
down by how often the unit occurs in the training lines.

    bench/recall.py [--unit word|char] RUN_DIR...

Prints a markdown table per run to stdout.
"""
import argparse, collections, difflib, os

BANDS = [(0, 0), (1, 4), (5, 19), (20, 99), (100, 999), (1000, None)]


def units(text, unit):
    return list(text) if unit == "char" else text.split()


def band_of(count):
    return next(i for i, (lo, hi) in enumerate(BANDS) if count >= lo and (hi is None or count <= hi))


def score(run, unit):
    counts = collections.Counter()
    with open(os.path.join(run, "train.txt"), encoding="utf-8-sig") as f:
        for line in f:
            counts.update(units(line.strip(), unit))
    total, in_place, in_order = (collections.Counter() for _ in range(3))
    with open(os.path.join(run, "reconstructions.tsv"), encoding="utf-8") as f:
        for line in f:
            cols = line.rstrip("\n").split("\t")
            if len(cols) < 2:
                continue
            x, y = units(cols[0], unit), units(cols[1], unit)
            matcher = difflib.SequenceMatcher(None, x, y, autojunk=False)
            aligned = {a + i for a, _, size in matcher.get_matching_blocks() for i in range(size)}
            for i, u in enumerate(x):
                b = band_of(counts[u])
                total[b] += 1
                in_place[b] += i < len(y) and y[i] == u
                in_order[b] += i in aligned
    return total, in_place, in_order


def table(run, unit):
    total, in_place, in_order = score(run, unit)
    n = sum(total.values())
    if n == 0:
        return f"{run}: no reconstructions\n"
    rows = [f"{os.path.basename(os.path.normpath(run))} ({unit}s)", "",
            f"| {unit}'s count in the training lines | share of the {unit}s | kept in place | kept in order |",
            "|---|---|---|---|"]
    for b, (lo, hi) in enumerate(BANDS):
        if total[b]:
            span = f"{lo}+" if hi is None else (f"{lo}" if lo == hi else f"{lo}-{hi}")
            rows.append(f"| {span} | {total[b] / n:.3f} | {in_place[b] / total[b]:.3f} | "
                        f"{in_order[b] / total[b]:.3f} |")
    rows.append(f"| all | 1.000 | {sum(in_place.values()) / n:.3f} | {sum(in_order.values()) / n:.3f} |")
    return "\n".join(rows) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--unit", choices=["word", "char"], default="word")
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args()
    for run in args.runs:
        for name in ("train.txt", "reconstructions.tsv"):
            if not os.path.isfile(os.path.join(run, name)):
                ap.error(f"{run} has no {name}: give a run directory bench/tatoeba.sh left under checkpoints/")
    print("\n".join(table(run, args.unit) for run in args.runs))


if __name__ == "__main__":
    main()
