//! Corpus reading, tokenization, the train/validation split and length-bucketed batches.
//!
//! A corpus is a UTF-8 file with one sentence per line. Blank lines are skipped; invalid UTF-8 is
//! an error naming the line; sentences longer than `max_len` tokens are skipped and counted
//! (truncating them would teach the decoder to end sentences mid-clause).

use std::io::BufRead;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use rand::seq::SliceRandom;
use rand::Rng;
use tch::{Device, Kind, Tensor};

use crate::tokenizer::{TextTokenizer, BOS, EOS, PAD};

/// Sentences of a corpus file with their 1-based line numbers.
#[derive(Debug, Clone, Default)]
pub struct Corpus {
    pub lines: Vec<String>,
    pub line_numbers: Vec<usize>,
    pub blank_skipped: usize,
}

/// Reads `path`: one sentence per line, trimmed; blank lines skipped.
pub fn read_corpus(path: &Path) -> Result<Corpus> {
    ensure!(path.exists(), "corpus {} does not exist", path.display());
    ensure!(
        !path.is_dir(),
        "corpus {} is a directory, not a file of sentences",
        path.display()
    );
    let file =
        std::fs::File::open(path).with_context(|| format!("opening corpus {}", path.display()))?;
    let corpus = parse_corpus(std::io::BufReader::with_capacity(1 << 20, file))
        .with_context(|| format!("corpus {}", path.display()))?;
    ensure!(
        !corpus.lines.is_empty(),
        "corpus {} has no sentences (empty or only blank lines)",
        path.display()
    );
    Ok(corpus)
}

/// Reads sentences line by line (never the whole file at once: a large corpus is held once, as
/// its sentences); fails on the first line that is not UTF-8.
pub fn parse_corpus(reader: impl BufRead) -> Result<Corpus> {
    let mut corpus = Corpus::default();
    for (i, raw) in reader.split(b'\n').enumerate() {
        let raw = raw.with_context(|| format!("reading line {}", i + 1))?;
        let raw = match i {
            0 => raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&raw),
            _ => &raw,
        };
        let line = match std::str::from_utf8(raw) {
            Ok(l) => l.trim(),
            Err(e) => bail!("line {} is not valid UTF-8 ({e})", i + 1),
        };
        if line.is_empty() {
            corpus.blank_skipped += 1;
            continue;
        }
        corpus.lines.push(line.to_string());
        corpus.line_numbers.push(i + 1);
    }
    Ok(corpus)
}

/// `max` of `n` positions spread evenly from the first to near the last (all `n` when
/// `max >= n`), so a subset of a file sorted by length still spans every length.
pub fn evenly_spaced(n: usize, max: usize) -> Vec<usize> {
    if max >= n {
        return (0..n).collect();
    }
    (0..max).map(|i| i * n / max).collect()
}

/// A seeded split: about `share` of the sentences held out, never trained on.
/// Takes `lines` rather than copying them: a large corpus is held once.
pub fn split_valid(lines: Vec<String>, share: f64, seed: u64) -> (Vec<String>, Vec<String>) {
    let mut rng = crate::seeded_rng(seed);
    let mut train = Vec::with_capacity(lines.len());
    let mut valid = Vec::new();
    for line in lines {
        if rng.random::<f64>() < share {
            valid.push(line);
        } else {
            train.push(line);
        }
    }
    // A tiny corpus can come out with an empty side; move one sentence over so both exist.
    if valid.is_empty() && train.len() > 1 {
        valid.push(train.pop().unwrap_or_default());
    }
    (train, valid)
}

/// Token ids of many sentences (without `<s>`/`</s>`) in one buffer, as the tokenizer gives
/// them (u32), with where each sentence ends: a corpus is held once, in half the bytes of i64
/// ids and without an allocation per sentence. Ids become i64 only in a batch's tensors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sentences {
    ids: Vec<u32>,
    ends: Vec<usize>,
}

impl Sentences {
    pub fn push(&mut self, ids: &[u32]) {
        self.ids.extend_from_slice(ids);
        self.ends.push(self.ids.len());
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Sentence `i`'s ids; panics past the end, as slice indexing does.
    pub fn get(&self, i: usize) -> &[u32] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.ids[start..self.ends[i]]
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[u32]> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    /// Tokens of each sentence, `</s>` not counted.
    pub fn lengths(&self) -> Vec<usize> {
        self.iter().map(<[u32]>::len).collect()
    }

    /// Tokens the decoder predicts: every sentence's, and its `</s>`.
    pub fn total_tokens(&self) -> usize {
        self.ids.len() + self.len()
    }

    /// The sentences at `idx`, in that order, as a new set.
    pub fn select(&self, idx: impl IntoIterator<Item = usize>) -> Sentences {
        idx.into_iter().map(|i| self.get(i)).collect()
    }

    /// `n` sentences spread evenly over the set (all of them when there are fewer), so a subset
    /// of a file sorted by length still spans every length.
    pub fn spread(&self, n: usize) -> Sentences {
        self.select(evenly_spaced(self.len(), n))
    }
}

impl<'a> FromIterator<&'a [u32]> for Sentences {
    fn from_iter<I: IntoIterator<Item = &'a [u32]>>(iter: I) -> Self {
        let mut out = Sentences::default();
        for s in iter {
            out.push(s);
        }
        out
    }
}

/// Tokenized sentences and what was skipped.
#[derive(Debug, Default)]
pub struct Encoded {
    pub seqs: Sentences,
    pub skipped_long: usize,
    pub skipped_empty: usize,
}

/// The characters of more than one byte in `lines`, each once, in code point order: what a
/// byte-level decoder may complete (ASCII always may).
pub fn characters(lines: &[String]) -> String {
    let set: std::collections::BTreeSet<char> = lines
        .iter()
        .flat_map(|l| l.chars())
        .filter(|c| c.len_utf8() > 1)
        .collect();
    set.into_iter().collect()
}

pub fn encode_lines(tok: &TextTokenizer, lines: &[String], max_len: usize) -> Result<Encoded> {
    let mut out = Encoded::default();
    tok.encode_each(lines, |_, ids| {
        if ids.is_empty() {
            out.skipped_empty += 1;
        } else if ids.len() > max_len {
            out.skipped_long += 1;
        } else {
            out.seqs.push(&ids);
        }
    })?;
    Ok(out)
}

/// A padded batch. Encoder input and decoder target are the same sequence `x_1..x_T </s>`;
/// the decoder input is that sequence shifted right behind `<s>`.
#[derive(Debug)]
pub struct Batch {
    /// [B, T] `x_1..x_T </s> <pad>...`
    pub targets: Tensor,
    /// [B, T] `<s> x_1..x_T <pad>...`
    pub inputs: Tensor,
    /// [B] sequence lengths including `</s>`.
    pub lengths: Tensor,
    /// Real (non-pad) target tokens in the batch.
    pub n_tokens: usize,
    /// Where the real target tokens are, built on the host with the batch so that finding them
    /// needs no `nonzero` (a wait for the device) in the forward pass.
    pub real: RealTokens,
}

/// The real (non-pad) positions of a [B, T] target tensor: what the output layer is computed on.
#[derive(Debug)]
pub struct RealTokens {
    /// [N] flat positions b * T + t, in row-major order.
    pub idx: Tensor,
    /// [N] the sentence (row b) of each.
    pub sentence: Tensor,
}

impl RealTokens {
    /// The real positions of the batch with each row repeated `s` times in place (row b becomes
    /// rows b*s .. b*s+s-1, as `repeat_interleave` lays them out) for targets `t` wide, computed
    /// from these without reading the targets back (no wait for the device).
    pub fn repeat_interleave(&self, s: i64, t: i64) -> RealTokens {
        let n = self.idx.size()[0];
        let pos = (&self.idx - &self.sentence * t)
            .unsqueeze(1)
            .expand([n, s], false); // [N, S]
        let copies = Tensor::arange(s, (Kind::Int64, self.idx.device())).unsqueeze(0); // [1, S]
        let sentence = (self.sentence.unsqueeze(1) * s + copies).reshape([-1]); // [N*S]
        let idx = &sentence * t + pos.reshape([-1]); // [N*S]
        RealTokens { idx, sentence }
    }
}

impl Batch {
    pub fn new(seqs: &[&[u32]], device: Device) -> Batch {
        let t = seqs.iter().map(|s| s.len() + 1).max().unwrap_or(1);
        let b = seqs.len();
        let mut targets = vec![PAD; b * t];
        let mut inputs = vec![PAD; b * t];
        let mut lengths = Vec::with_capacity(b);
        for (i, s) in seqs.iter().enumerate() {
            let row = i * t;
            inputs[row] = BOS;
            for (j, &id) in s.iter().enumerate() {
                let id = i64::from(id);
                targets[row + j] = id;
                inputs[row + j + 1] = id;
            }
            targets[row + s.len()] = EOS;
            lengths.push((s.len() + 1) as i64);
        }
        let n_tokens = lengths.iter().sum::<i64>() as usize;
        let mut idx = Vec::with_capacity(n_tokens);
        let mut sentence = Vec::with_capacity(n_tokens);
        for (i, &len) in lengths.iter().enumerate() {
            let row = (i * t) as i64;
            idx.extend(row..row + len);
            sentence.extend(std::iter::repeat_n(i as i64, len as usize));
        }
        // One host-to-device copy for the whole batch (a GPU waits on each), then views of it.
        let parts = [targets, inputs, lengths, idx, sentence];
        let all = Tensor::from_slice(&parts.concat()).to_device(device);
        let mut start = 0;
        let mut next = |len: usize| {
            let part = all.narrow(0, start, len as i64);
            start += len as i64;
            part
        };
        let shape = [b as i64, t as i64];
        Batch {
            targets: next(b * t).view(shape), // [B, T]
            inputs: next(b * t).view(shape),  // [B, T]
            lengths: next(b),                 // [B]
            n_tokens,
            real: RealTokens {
                idx: next(n_tokens),      // [N]
                sentence: next(n_tokens), // [N]
            },
        }
    }

    pub fn size(&self) -> i64 {
        self.targets.size()[0]
    }
}

/// Batches of indices into `lengths`, grouped by length so that little is padding, in a random
/// order. Ties in length are broken at random, so batches differ from epoch to epoch.
pub fn bucket_batches<R: Rng>(
    lengths: &[usize],
    batch_size: usize,
    rng: &mut R,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(rng);
    order.sort_by_key(|&i| lengths[i]); // stable: shuffled order survives within a length
    let mut batches: Vec<Vec<usize>> = order
        .chunks(batch_size.max(1))
        .map(|c| c.to_vec())
        .collect();
    batches.shuffle(rng);
    batches
}

/// Share of padding positions over all positions of the given batches.
pub fn padding_share(lengths: &[usize], batches: &[Vec<usize>]) -> f64 {
    let (mut real, mut total) = (0usize, 0usize);
    for batch in batches {
        let longest = batch.iter().map(|&i| lengths[i] + 1).max().unwrap_or(0);
        real += batch.iter().map(|&i| lengths[i] + 1).sum::<usize>();
        total += longest * batch.len();
    }
    if total == 0 {
        0.0
    } else {
        1.0 - real as f64 / total as f64
    }
}

/// Batches for evaluation and encoding: sentences grouped by length (little padding), each batch
/// with the indices of its sentences in `seqs`, so callers can put results back in input order.
pub fn sorted_batches<'a>(
    seqs: &'a Sentences,
    batch_size: usize,
    device: Device,
) -> impl Iterator<Item = (Vec<usize>, Batch)> + 'a {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| seqs.get(i).len());
    let chunks: Vec<Vec<usize>> = order
        .chunks(batch_size.max(1))
        .map(|c| c.to_vec())
        .collect();
    chunks.into_iter().map(move |idx| {
        let rows: Vec<&[u32]> = idx.iter().map(|&i| seqs.get(i)).collect();
        let batch = Batch::new(&rows, device);
        (idx, batch)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_are_the_multibyte_ones_each_once_in_order() {
        let lines = vec!["我们。Café".to_string(), "们我 naïve".to_string()];
        assert_eq!(characters(&lines), "éï。们我");
        assert_eq!(characters(&["plain".to_string()]), "");
    }

    #[test]
    fn parse_skips_blank_lines_and_names_bad_utf8() {
        let c = parse_corpus(&b"\xEF\xBB\xBFa b\n\n  \nc d\n"[..]).unwrap();
        assert_eq!(c.lines, vec!["a b", "c d"]);
        assert_eq!(c.line_numbers, vec![1, 4]);
        assert_eq!(c.blank_skipped, 2);
        // No final newline, CRLF endings, a blank last line.
        let c = parse_corpus(&b"x\r\n\r\ny z"[..]).unwrap();
        assert_eq!(
            (c.lines, c.blank_skipped),
            (vec!["x".into(), "y z".into()], 1)
        );
        let c = parse_corpus(&b"x\n\n"[..]).unwrap();
        assert_eq!((c.lines.len(), c.blank_skipped), (1, 1));
        let err = parse_corpus(&b"ok\nstill ok\nbad \xff byte\n"[..]).unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
    }

    #[test]
    fn bucketing_yields_every_sentence_exactly_once() {
        let mut rng = crate::seeded_rng(7);
        let lengths: Vec<usize> = (0..1003).map(|i| 1 + (i * 37) % 41).collect();
        for _epoch in 0..3 {
            let batches = bucket_batches(&lengths, 32, &mut rng);
            let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
            seen.sort();
            assert_eq!(seen, (0..1003).collect::<Vec<_>>());
            assert!(batches.iter().all(|b| !b.is_empty() && b.len() <= 32));
            assert!(padding_share(&lengths, &batches) < 0.05);
        }
    }

    /// The real positions found from the targets themselves (a `nonzero`, which waits for the
    /// device): the reference the positions built on the host are tested against.
    fn real_tokens_in(targets: &Tensor) -> RealTokens {
        let t = targets.size()[1];
        let idx = targets.reshape([-1]).ne(PAD).nonzero().squeeze_dim(1); // [N]
        let sentence = idx.divide_scalar_mode(t, "floor"); // [N]
        RealTokens { idx, sentence }
    }

    #[test]
    fn batch_layout_shifts_inputs_behind_bos() {
        let a: &[u32] = &[10, 11, 12];
        let b: &[u32] = &[20];
        let batch = Batch::new(&[a, b], Device::Cpu);
        let targets: Vec<i64> = Vec::try_from(batch.targets.view([-1])).unwrap();
        let inputs: Vec<i64> = Vec::try_from(batch.inputs.view([-1])).unwrap();
        assert_eq!(targets, vec![10, 11, 12, EOS, 20, EOS, PAD, PAD]);
        assert_eq!(inputs, vec![BOS, 10, 11, 12, BOS, 20, PAD, PAD]);
        assert_eq!(batch.n_tokens, 6);
        // The positions built on the host are the ones the device would find.
        let found = real_tokens_in(&batch.targets);
        assert!(batch.real.idx.equal(&found.idx));
        assert!(batch.real.sentence.equal(&found.sentence));
        let idx: Vec<i64> = Vec::try_from(&batch.real.idx).unwrap();
        assert_eq!(idx, vec![0, 1, 2, 3, 4, 5]);
        // Repeating the rows in place moves the positions with them.
        let repeated = batch.targets.repeat_interleave_self_int(3, 0, None); // [6, T]
        let found = real_tokens_in(&repeated);
        let moved = batch.real.repeat_interleave(3, 4);
        let pairs = |r: &RealTokens| {
            let mut v: Vec<(i64, i64)> = Vec::<i64>::try_from(&r.idx)
                .unwrap()
                .into_iter()
                .zip(Vec::<i64>::try_from(&r.sentence).unwrap())
                .collect();
            v.sort();
            v
        };
        assert_eq!(pairs(&moved), pairs(&found));
    }

    #[test]
    fn sentences_are_held_in_one_buffer_and_come_back_whole() {
        let rows: [&[u32]; 4] = [&[4, 5, 6], &[7], &[], &[8, 9]];
        let s: Sentences = rows.iter().copied().collect();
        assert_eq!(s.len(), 4);
        assert!(s.iter().eq(rows.iter().copied()));
        assert_eq!(s.lengths(), vec![3, 1, 0, 2]);
        assert_eq!(s.total_tokens(), 6 + 4);
        assert_eq!(
            s.select([3, 0]).iter().collect::<Vec<_>>(),
            vec![rows[3], rows[0]]
        );
        assert_eq!(
            s.spread(2).iter().collect::<Vec<_>>(),
            vec![rows[0], rows[2]]
        );
        assert_eq!(s.spread(9), s);
        assert!(Sentences::default().is_empty());
    }

    #[test]
    fn evenly_spaced_spans_the_set_without_repeats() {
        assert_eq!(evenly_spaced(10, 4), vec![0, 2, 5, 7]);
        assert_eq!(evenly_spaced(3, 5), vec![0, 1, 2]);
        assert_eq!(evenly_spaced(7, 0), Vec::<usize>::new());
        let picked = evenly_spaced(3761, 500);
        assert_eq!(picked.len(), 500);
        assert!(picked.windows(2).all(|w| w[0] < w[1]));
        assert!(*picked.last().unwrap() >= 3761 - 3761 / 500 - 1); // (max - 1) n / max, floored
    }

    #[test]
    fn split_is_seeded_and_disjoint() {
        let lines: Vec<String> = (0..2000).map(|i| format!("s{i}")).collect();
        let (t1, v1) = split_valid(lines.clone(), 0.05, 3);
        let (t2, v2) = split_valid(lines.clone(), 0.05, 3);
        assert_eq!(v1, v2);
        assert_eq!(t1, t2);
        assert_eq!(t1.len() + v1.len(), 2000);
        assert!((60..140).contains(&v1.len()), "{}", v1.len());
        assert!(v1.iter().all(|v| !t1.contains(v)));
    }
}
