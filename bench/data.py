#!/usr/bin/env python3
"""The data path on a large corpus: tokenizer training, then reading, tokenising and batching
(everything `textvae train` does before its first step), in seconds and peak RSS.
Called by bench/data.sh.

    data.py TEXTVAE CORPUS [--label L]

Steps, each a separate process:
1. `textvae info`: the RSS of loading libtorch alone (the floor of every command);
2. `textvae vocab CORPUS`: BPE tokenizer training;
3. `textvae train CORPUS --tokenizer <that>`: stopped as soon as it prints its plan line (after
   the corpus is read, split, tokenised and the epoch's batches are built), with the time to that
   line and the peak RSS (VmHWM) at that moment.
Writes bench/results/data-STAMP.{json,md}.
"""
import argparse, json, os, platform, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))


def peak_rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def timed(cmd, stdout=subprocess.DEVNULL):
    """Seconds and peak RSS (KiB) of a command run to its end (the kernel's account of that one
    child, by wait4). Fails with the command's stderr if it fails."""
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=stdout, stderr=err, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        secs = time.perf_counter() - start
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            err.seek(0)
            sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{err.read()[-4000:]}")
    return secs, usage.ru_maxrss


def until_plan(cmd):
    """Seconds until `textvae train` prints its plan line, the RSS peak then, and the line."""
    start = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stderr:
            if line.startswith("training "):
                return time.perf_counter() - start, peak_rss_kib(p.pid), line.strip()
        raise SystemExit(f"no plan line from {' '.join(cmd)}")
    finally:
        p.kill()
        p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("textvae")
    ap.add_argument("corpus")
    ap.add_argument("--label", default="data")
    a = ap.parse_args()
    stamp = time.strftime("%Y%m%dT%H%MZ", time.gmtime())
    lines = sum(1 for _ in open(a.corpus, "rb"))
    size = os.path.getsize(a.corpus)
    tmp = tempfile.mkdtemp(prefix="textvae-data-")
    tok = os.path.join(tmp, "tok.json")
    info_s, info_rss = timed([a.textvae, "info"])
    vocab_s, vocab_rss = timed([a.textvae, "vocab", a.corpus, "-o", tok])
    plan_s, plan_rss, plan = until_plan([a.textvae, "train", a.corpus, "--tokenizer", tok,
                                         "--out", os.path.join(tmp, "ck")])
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), platform.processor())
    result = dict(date=stamp, machine=f"{cpu}, {os.cpu_count()} cores", corpus_lines=lines,
                  corpus_bytes=size, libtorch_load_rss_mib=info_rss / 1024,
                  vocab_seconds=vocab_s, vocab_rss_mib=vocab_rss / 1024,
                  tokenise_and_batch_seconds=plan_s, tokenise_and_batch_rss_mib=plan_rss / 1024,
                  plan_line=plan)
    out = os.path.join(HERE, "results", f"{a.label}-{stamp}")
    json.dump(result, open(out + ".json", "w"), indent=2)
    md = [f"# Data path, {stamp}", "",
          f"{result['machine']}; corpus {lines:,} lines, {size / 1e6:.0f} MB.", "",
          "| step | seconds | peak RSS |", "|---|---|---|",
          f"| loading libtorch (`textvae info`) | {info_s:.1f} | {info_rss / 1024:.0f} MiB |",
          f"| BPE tokenizer training (`textvae vocab`) | {vocab_s:.1f} | {vocab_rss / 1024:.0f} MiB |",
          f"| read, split, tokenise, batch (`train` up to its plan line) | {plan_s:.1f} | "
          f"{plan_rss / 1024:.0f} MiB |", "", f"Plan line: `{plan}`"]
    open(out + ".md", "w").write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
