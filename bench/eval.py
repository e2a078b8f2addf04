#!/usr/bin/env python3
"""Importance-weighted evaluation on the PTB test set: wall time, sentences x samples per second,
the model's FLOP/s against the float32 matmul throughput of the same run, and peak RSS; with the
peak RSS of training on PTB. Called by bench/eval.sh.

    eval.py TEXTVAE PTB_DIR [--checkpoint DIR] [--iw-samples K] [--sentences N]
            [--precision auto|f32|bf16]

Without --checkpoint, first trains `--preset ptb` on ptb.train.txt for one epoch (every batch
shape of the corpus is seen once: training's peak RSS). Then, each its own process:
1. `textvae eval ptb.test.txt --iw-samples 1`: the fixed cost (start, loading, the ELBO pass,
   the mutual information, greedy reconstruction of every sentence);
2. `textvae eval ptb.test.txt --iw-samples K`: the wall time a user waits, and peak RSS.
The importance sampling's own rate is the difference: tokens x (K - 1) decoder positions in
t_K - t_1 seconds, each costing the forward pass's output layer (2HV) and LSTM (8H(E+Z+H)).
--precision is given to `textvae eval` (the LSTM's and the output layer's format in the importance samples;
default auto, textvae's own); the matmul peak is measured in the format that ran.
Writes bench/results/eval-STAMP.{json,md}.
"""
import argparse, json, os, platform, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from data import timed  # noqa: E402
from speed import DTYPES, matmul_gflops  # noqa: E402


def eval_run(a, test, k):
    """Seconds, peak RSS (KiB) and the JSON report of one `textvae eval`."""
    cmd = [a.textvae, "eval", test, "--checkpoint", a.checkpoint, "--iw-samples", str(k),
           "--json", "--seed", "1", "--precision", a.precision]
    if a.sentences:
        cmd += ["--sentences", str(a.sentences)]
    with tempfile.TemporaryFile("w+") as out:
        secs, rss = timed(cmd, stdout=out)
        out.seek(0)
        return secs, rss, json.loads(out.read())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("textvae")
    ap.add_argument("ptb")
    ap.add_argument("--checkpoint")
    ap.add_argument("--iw-samples", type=int, default=500)
    ap.add_argument("--sentences", type=int)
    ap.add_argument("--precision", choices=["auto", "f32", "bf16"], default="auto")
    a = ap.parse_args()
    stamp = time.strftime("%Y%m%dT%H%MZ", time.gmtime())
    train = None
    if not a.checkpoint:
        a.checkpoint = os.path.join(tempfile.mkdtemp(prefix="textvae-eval-"), "model")
        secs, rss = timed([a.textvae, "train", os.path.join(a.ptb, "ptb.train.txt"),
                           "--valid", os.path.join(a.ptb, "ptb.valid.txt"), "--preset", "ptb",
                           "--epochs", "1", "--out", a.checkpoint])
        train = dict(command="train --preset ptb --epochs 1", seconds=secs, peak_rss_mib=rss / 1024)
        print(f"training: {secs:.0f} s, peak RSS {rss / 1024:.0f} MiB", file=sys.stderr)
    cfg = json.load(open(os.path.join(a.checkpoint, "config.json")))["model"]
    test = os.path.join(a.ptb, "ptb.test.txt")
    base_s, base_rss, _ = eval_run(a, test, 1)
    secs, rss, report = eval_run(a, test, a.iw_samples)
    precision = report["iw_precision"]
    matmul = matmul_gflops(os.cpu_count(), DTYPES[precision])
    h, v, e, z = cfg["hidden_dim"], cfg["vocab_size"], cfg["emb_dim"], cfg["latent_dim"]
    flops = 2 * h * v + 8 * h * (e + z + h)
    positions = report["tokens"] * (a.iw_samples - 1)
    iw_s = max(secs - base_s, 1e-9)
    gflops = positions * flops / iw_s / 1e9
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), platform.processor())
    result = dict(
        date=stamp, machine=f"{cpu}, {os.cpu_count()} cores", iw_samples=a.iw_samples,
        precision=precision,
        sentences=report["sentences"], tokens=report["tokens"], seconds=secs,
        fixed_seconds=base_s, iw_seconds=iw_s,
        sentence_samples_per_sec=report["sentences"] * (a.iw_samples - 1) / iw_s,
        positions_per_sec=positions / iw_s, mflop_per_position=flops / 1e6, gflops=gflops,
        matmul_gflops=matmul, share_of_matmul=gflops / matmul, peak_rss_mib=rss / 1024,
        peak_rss_mib_k1=base_rss / 1024, training=train, report=report, model=cfg)
    out = os.path.join(HERE, "results", f"eval-{stamp}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    json.dump(result, open(out + ".json", "w"), indent=2)
    r = result
    lines = [
        f"# Importance-weighted evaluation, PTB test, {stamp}", "",
        f"{r['machine']}; model V = {v}, H = {h}, E = {e}, Z = {z}; "
        f"samples in {precision} (`--precision {a.precision}`); "
        f"{'bfloat16' if precision == 'bf16' else 'float32'} matmul {matmul:.1f} GFLOP/s in "
        "this run.", "",
        "| K | sentences | tokens | wall time | of which fixed (K = 1) | sentences x samples/s "
        "| decoder positions/s | GFLOP/s (share of matmul) | peak RSS | NLL | PPL |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {a.iw_samples} | {r['sentences']} | {r['tokens']} | {secs:.1f} s | {base_s:.1f} s "
        f"| {r['sentence_samples_per_sec']:.0f} | {r['positions_per_sec']:.0f} "
        f"| {gflops:.1f} ({r['share_of_matmul']:.0%}) | {r['peak_rss_mib']:.0f} MiB "
        f"| {report['nll']:.2f} | {report['ppl']:.2f} |",
    ]
    if train:
        lines += ["", f"Training (`textvae {train['command']}`, the model evaluated): "
                  f"{train['seconds']:.0f} s, peak RSS {train['peak_rss_mib']:.0f} MiB."]
    open(out + ".md", "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
