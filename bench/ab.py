#!/usr/bin/env python3
"""Training throughput of two textvae builds alternated on PTB (called by bench/ab.sh).

    ab.py PTB_DIR NAME=BINARY NAME=BINARY [--seconds S] [--rounds N] [--configs a,b]

Each round trains every config with each build for S seconds (a 100-sentence validation set,
no checkpoints written mid-run); a run's figure is the median real tokens/s of its logging
windows after the first (start-up), with its peak RSS. Writes bench/results/ab-STAMP.{md,json}.
"""
import argparse, json, os, platform, statistics, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import timed  # noqa: E402

R512 = ["--target-kl", "8", "--free-bits", "0", "--share-embeddings", "--z-skip",
        "--emb-dropout", "0.5", "--out-dropout", "0.5", "--emb-dim", "512", "--hidden-dim", "512",
        "--lr", "2e-3"]
CONFIGS = {
    "preset-auto": ["--preset", "ptb"],
    "preset-f32": ["--preset", "ptb", "--precision", "f32"],
    "r512-auto": ["--preset", "ptb"] + R512,
}


def run(binary, ptb, valid, flags, seconds, out):
    cmd = [binary, "train", os.path.join(ptb, "ptb.train.txt"), "--valid", valid,
           "--max-minutes", str(seconds / 60), "--log-every", "25", "--save-every", "0",
           "--out", out, "--seed", "1"] + flags
    _, rss = timed(cmd)
    windows = [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))
               if r["kind"] == "train"]
    return dict(tokens_per_sec=statistics.median(w["tokens_per_sec"] for w in windows[1:]),
                last_step=windows[-1]["step"], last_loss=windows[-1]["loss"],
                peak_rss_mib=rss / 1024)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ptb")
    ap.add_argument("builds", nargs=2, help="NAME=BINARY, the earlier build first")
    ap.add_argument("--seconds", type=float, default=45)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    a = ap.parse_args()
    builds = [b.split("=", 1) for b in a.builds]
    if builds[0][0] == builds[1][0]:
        sys.exit(f"ab.py: the two builds need different names, got {builds[0][0]} twice")
    configs = a.configs.split(",")
    stamp = time.strftime("%Y%m%dT%H%MZ", time.gmtime())
    tmp = tempfile.mkdtemp(prefix="textvae-ab-")
    valid = os.path.join(tmp, "valid.txt")
    with open(os.path.join(a.ptb, "ptb.valid.txt")) as f, open(valid, "w") as g:
        g.writelines(f.readlines()[:100])
    runs = {(c, n): [] for c in configs for n, _ in builds}
    for r in range(a.rounds):
        for c in configs:
            for name, binary in builds:
                res = run(binary, a.ptb, valid, CONFIGS[c], a.seconds,
                          os.path.join(tmp, f"{c}-{name}-{r}"))
                runs[(c, name)].append(res)
                print(f"round {r + 1} {c} {name}: {res['tokens_per_sec']:.0f} tokens/s, "
                      f"loss {res['last_loss']:.2f} at step {res['last_step']}, "
                      f"peak RSS {res['peak_rss_mib']:.0f} MiB", flush=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), platform.processor())
    (b0, _), (b1, _) = builds
    md = [f"# Training throughput, {b0} against {b1}, PTB, {stamp}", "",
          f"{cpu}, {os.cpu_count()} cores; {a.rounds} rounds of {a.seconds:.0f} s per run, "
          "alternated; real tokens/s, median of each run's windows after the first.", "",
          f"| config | {b0} (runs) | {b1} (runs) | ratio | peak RSS MiB, {b0} / {b1} |",
          "|---|---|---|---|---|"]
    for c in configs:
        med = [statistics.median(x["tokens_per_sec"] for x in runs[(c, n)]) for n, _ in builds]
        cells = [f"**{m:.0f}** (" + ", ".join(f"{x['tokens_per_sec']:.0f}" for x in runs[(c, n)])
                 + ")" for m, (n, _) in zip(med, builds)]
        rss = [max(x["peak_rss_mib"] for x in runs[(c, n)]) for n, _ in builds]
        md.append(f"| {c} | {cells[0]} | {cells[1]} | {med[1] / med[0]:.2f} | "
                  f"{rss[0]:.0f} / {rss[1]:.0f} |")
    md += ["", "Flags: " + "; ".join(f"{c}: `{' '.join(CONFIGS[c])}`" for c in configs)]
    out = f"bench/results/ab-{stamp}"
    json.dump(dict(date=stamp, machine=f"{cpu}, {os.cpu_count()} cores", seconds=a.seconds,
                   builds=[n for n, _ in builds],
                   runs={f"{c}/{n}": v for (c, n), v in runs.items()}),
              open(out + ".json", "w"), indent=1)
    open(out + ".md", "w").write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
