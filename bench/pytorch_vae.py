#!/usr/bin/env python3
"""The textvae model and training step written plainly in PyTorch, for bench/speed.sh to time
against `textvae train` on the same data, machine and libtorch (torch 2.13.0 from the same venv).

Identical to src/model.rs and src/train.rs in what costs time: the word tokenizer's ids (specials
<pad> 0, <s> 1, </s> 2, <unk> 3, then words by frequency), batches of sentences of similar length
(sorted by length, chunked, shuffled), the wide convolutional encoder with masked max pooling,
the reparameterised z, the LSTM decoder fed [embedding; z] at every step with its state
initialised from z, dropout on its input and output, word dropout, the output layer applied to
real tokens only, the KL term with free bits, global-norm clipping and Adam.

    pytorch_vae.py CORPUS --seconds S [--tie] [--conv-filters F] [--threads N] [--device cuda] ...

Prints one JSON line: steps, real tokens (targets, </s> included), seconds and tokens/s over the
steps after the first WARMUP ones, and the median tokens/s of windows of LOG_EVERY steps (as
textvae's metrics.jsonl records them).
"""
import argparse, collections, json, math, random, time

import torch
import torch.nn as nn
import torch.nn.functional as F

PAD, BOS, EOS, UNK = 0, 1, 2, 3


def read_corpus(path, vocab_size, max_len):
    lines = [l.split() for l in open(path, encoding="utf-8") if l.strip()]
    # PTB writes unknown words as <unk>: the special token, as in textvae's word tokenizer.
    counts = collections.Counter(w for l in lines for w in l if w != "<unk>")
    words = [w for w, _ in counts.most_common(vocab_size - 4)]
    ids = {w: i + 4 for i, w in enumerate(words)}
    seqs = [[ids.get(w, UNK) for w in l] for l in lines if len(l) <= max_len]
    return seqs, len(words) + 4


def bucket_batches(lengths, batch_size, rng):
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order.sort(key=lambda i: lengths[i])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def make_batch(seqs):
    t = max(len(s) for s in seqs) + 1
    b = len(seqs)
    targets = torch.zeros(b, t, dtype=torch.long)
    inputs = torch.zeros(b, t, dtype=torch.long)
    inputs[:, 0] = BOS
    for i, s in enumerate(seqs):
        if s:
            row = torch.tensor(s)
            targets[i, :len(s)] = row
            inputs[i, 1:len(s) + 1] = row
        targets[i, len(s)] = EOS
    lengths = torch.tensor([len(s) + 1 for s in seqs])
    return targets, inputs, lengths


def mixed(device, bf16):
    """--bf16: torch.autocast around the products textvae's --precision bf16 takes in bfloat16
    (the convolutions, the LSTM, the output layer); the small heads stay float32 as there."""
    return torch.autocast(device.type, torch.bfloat16, enabled=bf16)


class Encoder(nn.Module):
    def __init__(self, v, e, f, widths, z, bf16=False):
        super().__init__()
        self.bf16 = bf16
        self.emb = nn.Embedding(v, e)
        self.convs = nn.ModuleList(nn.Conv1d(e, f, k, padding=k - 1) for k in widths)
        self.widths = widths
        self.mu = nn.Linear(f * len(widths), z)
        self.logvar = nn.Linear(f * len(widths), z)

    def forward(self, tokens, lengths):
        t = tokens.size(1)
        real = tokens.ne(PAD).unsqueeze(-1).float()  # [B, T, 1]
        x = (self.emb(tokens) * real).transpose(1, 2)  # [B, E, T]
        pooled = []
        for k, conv in zip(self.widths, self.convs):
            with mixed(x.device, self.bf16):
                h = conv(x).relu()  # [B, F, T + k - 1]
            valid = torch.arange(t + k - 1, device=tokens.device).unsqueeze(0) < (lengths.unsqueeze(1) + k - 1)
            pooled.append(h.masked_fill(~valid.unsqueeze(1), float("-inf")).amax(2))
        features = torch.cat(pooled, 1).float()
        return self.mu(features), self.logvar(features)


class Decoder(nn.Module):
    def __init__(self, v, e, h, z, tie, dropout, bf16=False):
        super().__init__()
        self.bf16 = bf16
        self.emb = nn.Embedding(v, e)
        self.init = nn.Linear(z, 2 * h)
        self.lstm = nn.LSTM(e + z, h, batch_first=True)
        self.out = nn.Linear(h, v)
        if tie:
            self.out.weight = self.emb.weight
        self.h = h
        self.dropout = dropout

    def forward(self, inputs, z, targets):
        b, t = inputs.shape
        e = F.dropout(self.emb(inputs), self.dropout, self.training)
        x = torch.cat([e, z.unsqueeze(1).expand(-1, t, -1)], 2)  # [B, T, E + Z]
        hc = self.init(z).tanh().view(b, 2, self.h).transpose(0, 1).contiguous()
        h0, c0 = hc.chunk(2, 0)
        with mixed(x.device, self.bf16):
            out, _ = self.lstm(x, (h0.contiguous(), c0.contiguous()))
        out = out.float()
        out = F.dropout(out, self.dropout, self.training)
        flat = targets.reshape(-1)
        idx = flat.ne(PAD).nonzero().squeeze(1)  # real tokens only, as textvae
        with mixed(out.device, self.bf16):
            logits = self.out(out.reshape(-1, self.h).index_select(0, idx))
        logits = logits.float()
        nll = F.cross_entropy(logits, flat.index_select(0, idx), reduction="none")
        sentence = torch.div(idx, t, rounding_mode="floor")
        return torch.zeros(b, device=nll.device).index_add(0, sentence, nll)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--warmup", type=int, default=25)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--vocab-size", type=int, default=20000)
    ap.add_argument("--max-len", type=int, default=100)
    ap.add_argument("--emb-dim", type=int, default=256)
    ap.add_argument("--hidden-dim", type=int, default=256)
    ap.add_argument("--latent-dim", type=int, default=32)
    ap.add_argument("--conv-filters", type=int, default=128)
    ap.add_argument("--tie", action="store_true")
    ap.add_argument("--dropout", type=float, default=0.3)
    ap.add_argument("--word-dropout", type=float, default=0.0)
    ap.add_argument("--free-bits", type=float, default=0.15)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--clip-norm", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true",
                    help="the convolutions, the LSTM and the output layer in bfloat16 "
                         "(torch.autocast), as textvae's --precision bf16")
    ap.add_argument("--fused-adam", action="store_true",
                    help="torch.optim.Adam(fused=True), the kernel textvae's optimiser runs "
                         "(the default is PyTorch's own default: one op per step of the rule)")
    a = ap.parse_args()
    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    seqs, v = read_corpus(a.corpus, a.vocab_size, a.max_len)
    enc = Encoder(v, a.emb_dim, a.conv_filters, [3, 4, 5], a.latent_dim, a.bf16)
    dec = Decoder(v, a.emb_dim, a.hidden_dim, a.latent_dim, a.tie, a.dropout, a.bf16)
    enc.to(device); dec.to(device)
    params = list(enc.parameters()) + [p for p in dec.parameters()]
    opt = torch.optim.Adam(params, lr=a.lr, fused=a.fused_adam or None)
    enc.train(); dec.train()
    steps, tokens, start, beta = 0, 0, None, 0.0
    windows, w_tokens, w_start = [], 0, None
    while True:
        for batch in bucket_batches([len(s) for s in seqs], a.batch_size, rng):
            if steps == a.warmup:
                start, tokens = time.perf_counter(), 0
                w_start, w_tokens = start, 0
            targets, inputs, lengths = (x.to(device, non_blocking=True)
                                        for x in make_batch([seqs[i] for i in batch]))
            if a.word_dropout > 0:
                drop = (torch.rand(inputs.shape, device=device) < a.word_dropout) & inputs.ne(PAD)
                drop[:, 0] = False
                inputs = inputs.masked_fill(drop, UNK)
            mu, logvar = enc(targets, lengths)
            z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
            rec = dec(inputs, z, targets).mean()
            kl = (0.5 * (mu.square() + logvar.exp() - 1 - logvar)).mean(0)
            kl_term = kl.clamp_min(a.free_bits).sum() if a.free_bits > 0 else kl.sum()
            beta = min(1.0, beta + 1.0 / 10000)
            loss = rec + beta * kl_term
            opt.zero_grad()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, a.clip_norm)
            if math.isfinite(float(norm)) and math.isfinite(float(loss)):
                opt.step()
            steps += 1
            n = sum(len(seqs[i]) + 1 for i in batch)
            tokens += n
            w_tokens += n
            if w_start is not None and (steps - a.warmup) % a.log_every == 0:
                now = time.perf_counter()
                windows.append(w_tokens / (now - w_start))
                w_start, w_tokens = now, 0
            if start is not None and time.perf_counter() - start >= a.seconds:
                secs = time.perf_counter() - start
                print(json.dumps({"impl": "pytorch", "steps": steps - a.warmup, "tokens": tokens,
                                  "seconds": secs, "tokens_per_sec": tokens / secs,
                                  "window_median": sorted(windows)[len(windows) // 2] if windows else None,
                                  "vocab": v, "threads": a.threads, "device": a.device}))
                return


if __name__ == "__main__":
    main()
