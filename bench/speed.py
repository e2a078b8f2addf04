#!/usr/bin/env python3
"""Training throughput, textvae against the same model in PyTorch (bench/pytorch_vae.py), on PTB,
run in alternation on one machine, with float32 matmul throughput measured in the same run.
Called by bench/speed.sh, which builds textvae and finds the venv's python first.

    speed.py TEXTVAE PTB_DIR [--seconds S] [--rounds R] [--models default,untied] [--batch-size B]
             [--precisions f32,bf16]

For each model and round: `textvae train` for S seconds of training (validation on 100 sentences,
no checkpoints within the run), then pytorch_vae.py for S seconds, then pytorch_vae.py again with
glibc given textvae's allocator settings (runtime::tune_allocator) through its environment, so
that gain is shown apart. Throughput is real tokens
(targets, </s> included, padding not) per second: the median of the logging windows of 25 steps
after the first (textvae's metrics.jsonl; the script's own windows). The model's FLOP/s is
throughput x training FLOPs per real token (3 x forward: output layer 2HV, LSTM 8H(E+Z+H),
encoder convolutions 2FE x sum of widths), against the best of three matmul shapes.
--precisions (default f32) lists the matrix products' number formats to run, each a row: given to
both programs (textvae's --precision, the script's --bf16: convolutions, LSTM and output layer under torch.autocast),
with the matmul peak measured in that format too.
Writes bench/results/speed-STAMP.{json,md}.
"""
import argparse, json, os, platform, statistics, subprocess, sys, tempfile, time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

# name: (textvae flags over --preset ptb, pytorch_vae.py flags, dims for the FLOP count)
MODELS = {
    "default": ([], ["--tie", "--conv-filters", "128"],
                dict(E=256, H=256, Z=32, F=128, widths=[3, 4, 5])),
    "untied": (["--tie-embeddings", "false", "--conv-filters", "256"], ["--conv-filters", "256"],
               dict(E=256, H=256, Z=32, F=256, widths=[3, 4, 5])),
}


def flops_per_token(d, vocab):
    forward = 2 * d["H"] * vocab + 8 * d["H"] * (d["E"] + d["Z"] + d["H"]) \
        + 2 * d["F"] * d["E"] * sum(d["widths"])
    return 3 * forward


DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def matmul_gflops(threads, dtype):
    torch.set_num_threads(threads)
    best = 0.0
    for m, k, n in [(1024, 1024, 1024), (768, 256, 10000), (2048, 256, 1024)]:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(3):
            a @ b
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < 2.0:
            a @ b
            reps += 1
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9)
    return best


def run_textvae(binary, ptb, valid, flags, seconds, out, batch_size):
    cmd = [binary, "train", os.path.join(ptb, "ptb.train.txt"), "--valid", valid,
           "--preset", "ptb", "--max-minutes", str(seconds / 60), "--log-every", "25",
           "--save-every", "0", "--batch-size", str(batch_size), "--out", out] + flags
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    speeds = [r["tokens_per_sec"] for r in records if r["kind"] == "train"][1:]
    vocab = json.load(open(os.path.join(out, "config.json")))["model"]["vocab_size"]
    return statistics.median(speeds), vocab


# What runtime::tune_allocator sets in textvae, given to glibc through its environment.
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


def run_pytorch(ptb, flags, seconds, threads, batch_size, tuned=False):
    cmd = [sys.executable, os.path.join(HERE, "pytorch_vae.py"),
           os.path.join(ptb, "ptb.train.txt"), "--seconds", str(seconds),
           "--threads", str(threads), "--batch-size", str(batch_size)] + flags
    env = dict(os.environ, **TUNED_MALLOC) if tuned else None
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return r["window_median"], r["vocab"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("textvae")
    ap.add_argument("ptb")
    ap.add_argument("--seconds", type=float, default=45)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", default="default,untied")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--label", default="speed")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precisions", default="f32",
                    help="comma-separated, of f32 and bf16: each is a row of its own")
    a = ap.parse_args()
    precisions = a.precisions.split(",")
    assert set(precisions) <= set(DTYPES), f"--precisions takes f32 and bf16, got {precisions}"
    stamp = time.strftime("%Y%m%dT%H%MZ", time.gmtime())
    tmp = tempfile.mkdtemp(prefix="textvae-speed-")
    valid = os.path.join(tmp, "valid.txt")
    with open(os.path.join(a.ptb, "ptb.valid.txt")) as f, open(valid, "w") as g:
        g.writelines(f.readlines()[:100])
    rows, matmul = [], {p: [] for p in precisions}
    for name in a.models.split(","):
        tv_flags, py_flags, dims = MODELS[name]
        for prec in precisions:
            tv_run = tv_flags + ["--precision", prec]
            py_run = py_flags + (["--bf16"] if prec == "bf16" else [])
            tv, py, py_tuned = [], [], []
            for r in range(a.rounds):
                matmul[prec].append(matmul_gflops(a.threads, DTYPES[prec]))
                speed, vocab = run_textvae(a.textvae, a.ptb, valid, tv_run, a.seconds,
                                           os.path.join(tmp, f"{name}-{prec}-{r}"), a.batch_size)
                tv.append(speed)
                speed, py_vocab = run_pytorch(a.ptb, py_run, a.seconds, a.threads, a.batch_size)
                py.append(speed)
                py_tuned.append(run_pytorch(a.ptb, py_run, a.seconds, a.threads, a.batch_size,
                                            tuned=True)[0])
                print(f"{name} {prec} round {r + 1}: textvae {tv[-1]:.0f}, pytorch {py[-1]:.0f}, "
                      f"pytorch with textvae's malloc settings {py_tuned[-1]:.0f} tokens/s, "
                      f"{prec} matmul {matmul[prec][-1]:.1f} GFLOP/s", file=sys.stderr)
            assert vocab == py_vocab, f"vocabularies differ: {vocab} vs {py_vocab}"
            rows.append(dict(model=name, precision=prec, textvae_flags=" ".join(
                                 ["--preset", "ptb", "--batch-size", str(a.batch_size)] + tv_run),
                             vocab=vocab, flops_per_token=flops_per_token(dims, vocab),
                             textvae=tv, pytorch=py, pytorch_tuned_malloc=py_tuned,
                             textvae_median=statistics.median(tv),
                             pytorch_median=statistics.median(py),
                             pytorch_tuned_malloc_median=statistics.median(py_tuned)))
    peak = {p: statistics.median(xs) for p, xs in matmul.items()}
    for row in rows:
        row["ratio"] = row["textvae_median"] / row["pytorch_median"]
        row["textvae_gflops"] = row["textvae_median"] * row["flops_per_token"] / 1e9
        row["pytorch_gflops"] = row["pytorch_median"] * row["flops_per_token"] / 1e9
        row["textvae_share_of_matmul"] = row["textvae_gflops"] / peak[row["precision"]]
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), platform.processor())
    result = dict(date=stamp, machine=f"{cpu}, {os.cpu_count()} cores", threads=a.threads,
                  seconds=a.seconds, rounds=a.rounds, torch=torch.__version__,
                  matmul_gflops=matmul, matmul_gflops_median=peak, models=rows)
    out = os.path.join(HERE, "results", f"{a.label}-{stamp}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    json.dump(result, open(out + ".json", "w"), indent=2)
    peaks = ", ".join(f"{p} {v:.1f}" for p, v in peak.items())
    lines = [f"# Training throughput on PTB, {stamp}", "",
             f"{result['machine']}, {a.threads} threads, torch {torch.__version__}; "
             f"{a.rounds} rounds of {a.seconds:.0f} s each, in alternation; "
             f"matmul GFLOP/s (median of rounds): {peaks}. A row's precision is that of both "
             "programs' output layer; its share is of the matmul peak in that format.", "",
             "| model | precision | real tokens/s textvae (rounds) | PyTorch (rounds) | ratio | "
             "PyTorch with textvae's malloc settings | MFLOP/token | textvae GFLOP/s | "
             "share of matmul |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        fmt = lambda xs: ", ".join(f"{x:.0f}" for x in xs)
        lines.append(
            f"| {row['model']} (`{row['textvae_flags']}`) | {row['precision']} | "
            f"**{row['textvae_median']:.0f}** "
            f"({fmt(row['textvae'])}) | {row['pytorch_median']:.0f} ({fmt(row['pytorch'])}) | "
            f"**{row['ratio']:.2f}** | {row['pytorch_tuned_malloc_median']:.0f} "
            f"({fmt(row['pytorch_tuned_malloc'])}) | {row['flops_per_token'] / 1e6:.1f} | "
            f"{row['textvae_gflops']:.1f} | {row['textvae_share_of_matmul']:.0%} |")
    open(out + ".md", "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
