//! Keeps what a byte-level decoder writes valid UTF-8. A byte-level BPE (GPT-2; Radford et al.
//! 2019) has tokens for single bytes and for pieces of characters, so a decoder that chooses
//! freely can end a character early or start one with a continuation byte, and the text then
//! shows U+FFFD ("我们上的沙�击在沙。"). Each sentence being decoded carries its place inside a
//! character, the state of the automaton of well-formed UTF-8 (Unicode 15, Table 3-7), and only
//! the tokens whose bytes continue it may come next; `</s>` and the other special tokens only
//! between characters. Given the characters of the training corpus, the guard goes further and
//! lets a character be completed only as one of them: byte pieces can otherwise spell characters
//! the corpus never had (a Chinese model wrote 龗 and 缢 in 8% of its samples), and those states
//! are the prefixes of the corpus's characters rather than UTF-8's eight.

use std::collections::HashMap;
use std::fmt;

use tch::{Device, Tensor};

use crate::tokenizer::{TextTokenizer, SPECIALS};

/// Between characters: where every sentence starts and must end.
pub const START: u16 = 0;
const UTF8_STATES: usize = 8;
const REJECT: u16 = u16::MAX;

/// The automaton of well-formed UTF-8: the state after byte `b` in state `s`, or REJECT. States:
/// 0 between characters; 1 one continuation byte (80..BF) to go; 2 two to go; 3 after E0 (next
/// A0..BF, no overlong form); 4 after ED (next 80..9F, no surrogate); 5 three to go; 6 after F0
/// (next 90..BF); 7 after F4 (next 80..8F, nothing past U+10FFFF).
fn after_byte(s: u16, b: u8) -> u16 {
    match (s, b) {
        (0, 0x00..=0x7F) | (1, 0x80..=0xBF) => 0,
        (0, 0xC2..=0xDF) | (2, 0x80..=0xBF) | (3, 0xA0..=0xBF) | (4, 0x80..=0x9F) => 1,
        (0, 0xE1..=0xEC | 0xEE..=0xEF) | (5, 0x80..=0xBF) | (6, 0x90..=0xBF) | (7, 0x80..=0x8F) => {
            2
        }
        (0, 0xE0) => 3,
        (0, 0xED) => 4,
        (0, 0xF1..=0xF3) => 5,
        (0, 0xF0) => 6,
        (0, 0xF4) => 7,
        _ => REJECT,
    }
}

/// A byte automaton as a table: `next[s * 256 + b]`, and its number of states.
struct ByteTable {
    next: Vec<u16>,
    states: usize,
}

impl ByteTable {
    /// Well-formed UTF-8.
    fn utf8() -> Self {
        let next = (0..UTF8_STATES as u16)
            .flat_map(|s| (0..=255u8).map(move |b| after_byte(s, b)))
            .collect();
        Self {
            next,
            states: UTF8_STATES,
        }
    }

    /// ASCII, and the characters of `chars` of more than one byte: a state for each proper
    /// prefix of their UTF-8 forms (a trie, laid out as the table), START once one is complete.
    fn characters(chars: &str) -> Self {
        let mut ids: HashMap<&[u8], u16> = HashMap::from([(&[][..], START)]);
        let mut next = vec![REJECT; 256];
        next[..0x80].fill(START);
        for (i, c) in chars.char_indices() {
            let bytes = &chars.as_bytes()[i..i + c.len_utf8()];
            for k in 0..bytes.len() {
                let from = ids[&bytes[..k]] as usize;
                let to = if k + 1 == bytes.len() {
                    START
                } else {
                    let fresh = ids.len() as u16;
                    let id = *ids.entry(&bytes[..=k]).or_insert(fresh);
                    if id == fresh {
                        next.extend([REJECT; 256]);
                    }
                    id
                };
                next[from * 256 + bytes[k] as usize] = to;
            }
        }
        Self {
            next,
            states: ids.len(),
        }
    }

    fn after(&self, s: u16, b: u8) -> u16 {
        self.next[s as usize * 256 + b as usize]
    }
}

/// Which token may follow which state, for one byte-level vocabulary.
#[derive(Clone, PartialEq)]
pub struct Utf8Guard {
    /// `next[s * vocab + t]`: the state after token t in state s, or REJECT.
    next: Vec<u16>,
    states: usize,
    vocab: usize,
}

impl fmt::Debug for Utf8Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Utf8Guard")
            .field("states", &self.states)
            .field("vocab", &self.vocab)
            .finish()
    }
}

/// More prefixes than this (a corpus of several scripts' thousands of characters) and the mask
/// of [states, V] grows past what a decoding should build: the guard keeps to UTF-8 then.
const MAX_CHARACTER_STATES: usize = 1024;

impl Utf8Guard {
    /// The guard for `tok`'s vocabulary, completing only the characters of `chars` when given
    /// (the training corpus's); None for a tokenizer whose tokens are whole strings.
    pub fn new(tok: &TextTokenizer, chars: Option<&str>) -> Option<Self> {
        Self::from_token_bytes(&tok.token_bytes()?, chars)
    }

    /// The guard for tokens spelled by `bytes` (by id; the special tokens are the first ids and
    /// have no bytes), over `chars` as [`Self::new`]. None when a state the tokens can reach
    /// inside a character has no token to continue it (a vocabulary without its single bytes):
    /// the guard would leave a sentence no way on.
    pub fn from_token_bytes(bytes: &[Vec<u8>], chars: Option<&str>) -> Option<Self> {
        let table = chars
            .map(ByteTable::characters)
            .filter(|t| t.states <= MAX_CHARACTER_STATES)
            .unwrap_or_else(ByteTable::utf8);
        let vocab = bytes.len();
        let mut next = vec![REJECT; table.states * vocab];
        for s in 0..table.states as u16 {
            for (t, spelled) in bytes.iter().enumerate() {
                next[s as usize * vocab + t] = if t < SPECIALS.len() || spelled.is_empty() {
                    if s == START {
                        START
                    } else {
                        REJECT
                    }
                } else {
                    spelled
                        .iter()
                        .try_fold(s, |s, &b| Some(table.after(s, b)).filter(|&n| n != REJECT))
                        .unwrap_or(REJECT)
                };
            }
        }
        let guard = Self {
            next,
            states: table.states,
            vocab,
        };
        guard
            .reachable()
            .into_iter()
            .all(|s| (0..vocab).any(|t| guard.allows(s, t as i64)))
            .then_some(guard)
    }

    /// The states some sequence of tokens leads to from START.
    fn reachable(&self) -> Vec<u16> {
        let mut seen = vec![START];
        let mut i = 0;
        while i < seen.len() {
            let s = seen[i] as usize;
            for &n in &self.next[s * self.vocab..(s + 1) * self.vocab] {
                if n != REJECT && !seen.contains(&n) {
                    seen.push(n);
                }
            }
            i += 1;
        }
        seen
    }

    fn allows(&self, s: u16, t: i64) -> bool {
        self.next[s as usize * self.vocab + t as usize] != REJECT
    }

    /// The state after token `t` in state `s`. A token the guard forbids (only chosen when the
    /// repeat guard has banned every allowed one) starts afresh between characters: the text has
    /// a U+FFFD there, as it would without the guard.
    pub fn after(&self, s: u16, t: i64) -> u16 {
        if (0..self.vocab as i64).contains(&t) && self.allows(s, t) {
            self.next[s as usize * self.vocab + t as usize]
        } else {
            START
        }
    }

    /// The length of the longest prefix of `tokens` that ends between characters: a sentence the
    /// length limit cut inside a character loses that piece.
    pub fn whole(&self, tokens: &[i64]) -> usize {
        let mut s = START;
        let mut end = 0;
        for (i, &t) in tokens.iter().enumerate() {
            s = self.after(s, t);
            if s == START {
                end = i + 1;
            }
        }
        end
    }

    /// [S, V] to add to a step's logits: 0 where the token may follow the state, -inf where not.
    fn mask(&self, device: Device) -> Tensor {
        let mask: Vec<f32> = self
            .next
            .iter()
            .map(|&n| if n == REJECT { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        Tensor::from_slice(&mask)
            .view([self.states as i64, self.vocab as i64]) // [S, V]
            .to_device(device)
    }
}

/// The states of the rows of one decoding, and the guard's mask on their device. With no guard
/// every call is a no-op, so decoders need no second path.
pub struct Utf8Rows<'a> {
    guard: Option<(&'a Utf8Guard, Tensor)>,
    states: Vec<u16>,
}

impl<'a> Utf8Rows<'a> {
    /// `rows` rows between characters.
    pub fn new(guard: Option<&'a Utf8Guard>, rows: usize, device: Device) -> Self {
        Self {
            guard: guard.map(|g| (g, g.mask(device))),
            states: vec![START; rows],
        }
    }

    /// `logits` [R, V] with the tokens no row may take next at -inf.
    pub fn restrict(&self, logits: Tensor) -> Tensor {
        let Some((_, mask)) = &self.guard else {
            return logits;
        };
        let states: Vec<i64> = self.states.iter().map(|&s| i64::from(s)).collect();
        let idx = Tensor::from_slice(&states).to_device(mask.device());
        logits + mask.index_select(0, &idx) // [R, V]
    }

    /// The next step's rows: row i continues row `src[i]` with token `tokens[i]`.
    pub fn continue_rows(&mut self, src: &[i64], tokens: &[i64]) {
        let Some((guard, _)) = &self.guard else {
            return;
        };
        self.states = src
            .iter()
            .zip(tokens)
            .map(|(&r, &t)| guard.after(self.states[r as usize], t))
            .collect();
    }

    /// Each row continues with its token in `tokens` (one per row).
    pub fn advance(&mut self, tokens: &[i64]) {
        let rows: Vec<i64> = (0..tokens.len() as i64).collect();
        self.continue_rows(&rows, tokens);
    }

    /// `sentences` with any character the length limit cut short taken off their ends.
    pub fn trim(&self, mut sentences: Vec<Vec<i64>>) -> Vec<Vec<i64>> {
        if let Some((guard, _)) = &self.guard {
            for s in &mut sentences {
                s.truncate(guard.whole(s));
            }
        }
        sentences
    }

    /// Whether row `r` is between characters (always, with no guard).
    pub fn between_characters(&self, r: usize) -> bool {
        self.guard.is_none() || self.states[r] == START
    }

    /// Keeps the rows `keep` (indices of the current rows), in that order.
    pub fn keep(&mut self, keep: &[i64]) {
        self.states = keep.iter().map(|&j| self.states[j as usize]).collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// Ids 0..4 special, then: "a", a lone E6, the rest of 我 (88 91), all of 我, a lone
    /// continuation byte, "。" (E3 80 82), 2-byte "é" (C3 A9), its lead C3, and the overlong C0 AF.
    fn toy() -> Vec<Vec<u8>> {
        let mut v = vec![Vec::new(); SPECIALS.len()];
        v.extend([
            b"a".to_vec(),
            vec![0xE6],
            vec![0x88, 0x91],
            "我".as_bytes().to_vec(),
            vec![0x80],
            "。".as_bytes().to_vec(),
            "é".as_bytes().to_vec(),
            vec![0xC3],
            vec![0xC0, 0xAF],
        ]);
        v
    }

    fn allowed(g: &Utf8Guard, s: u16) -> Vec<i64> {
        (0..g.vocab as i64).filter(|&t| g.allows(s, t)).collect()
    }

    #[test]
    fn between_characters_only_whole_starts_and_specials_may_come() {
        let g = Utf8Guard::from_token_bytes(&toy(), None).unwrap();
        // Not the lone continuation (8), not 88 91 (6), not the overlong form (12).
        assert_eq!(allowed(&g, START), vec![0, 1, 2, 3, 4, 5, 7, 9, 10, 11]);
        let mid = g.after(START, 5); // after E6: two continuation bytes to go
        assert_eq!(mid, 2);
        assert_eq!(
            allowed(&g, mid),
            vec![6, 8],
            "88 91 finishes 我; 80 goes on"
        );
        assert_eq!(g.after(mid, 6), START);
        assert_eq!(allowed(&g, g.after(mid, 8)), vec![8]);
        assert_eq!(
            allowed(&g, g.after(START, 11)),
            vec![8],
            "after C3 only a continuation"
        );
        assert_eq!(g.after(START, 7), START, "我 is whole");
        assert_eq!(g.after(2, 4), START, "a forbidden token starts afresh");
        assert_eq!(g.whole(&[4, 5, 6, 4, 5]), 4, "the cut 我 is dropped");
        assert_eq!(g.whole(&[4, 5, 8, 8]), 4);
        assert_eq!(g.whole(&[5]), 0);
    }

    #[test]
    fn with_a_character_set_only_its_characters_are_completed() {
        // 我 and 。 are the corpus's; é is not, nor anything else that starts with E6.
        let g = Utf8Guard::from_token_bytes(&toy(), Some("。我")).unwrap();
        assert_eq!(allowed(&g, START), vec![0, 1, 2, 3, 4, 5, 7, 9]);
        let mid = g.after(START, 5); // after E6
        assert_eq!(
            allowed(&g, mid),
            vec![6],
            "88 91 finishes 我; 80 would start another"
        );
        assert_eq!(g.after(mid, 6), START);
        // One state between characters, E6, E6 88, E3 and E3 80.
        assert_eq!(g.states, 5);
    }

    #[test]
    fn the_automaton_accepts_exactly_what_rust_calls_utf8() {
        let cases: [&[u8]; 10] = [
            b"plain",
            "我们。é🙂".as_bytes(),
            &[0xE0, 0xA0, 0x80],
            &[0xE0, 0x9F, 0xBF],
            &[0xED, 0x9F, 0xBF],
            &[0xED, 0xA0, 0x80],
            &[0xF4, 0x8F, 0xBF, 0xBF],
            &[0xF4, 0x90, 0x80, 0x80],
            &[0xF0, 0x8F, 0xBF, 0xBF],
            &[0xE6, 0x88],
        ];
        for bytes in cases {
            let end = bytes.iter().try_fold(START, |s, &b| {
                Some(after_byte(s, b)).filter(|&n| n != REJECT)
            });
            assert_eq!(
                end == Some(START),
                std::str::from_utf8(bytes).is_ok(),
                "{bytes:x?}"
            );
        }
    }

    #[test]
    fn a_vocabulary_that_cannot_finish_a_character_gets_no_guard() {
        let mut v = vec![Vec::new(); SPECIALS.len()];
        v.extend([b"a".to_vec(), vec![0xE6]]);
        assert!(Utf8Guard::from_token_bytes(&v, None).is_none());
    }

    #[test]
    fn rows_mask_their_logits_and_follow_their_tokens() {
        let g = Utf8Guard::from_token_bytes(&toy(), None).unwrap();
        let mut rows = Utf8Rows::new(Some(&g), 2, Device::Cpu);
        rows.advance(&[5, 4]); // row 0 mid-character, row 1 between
        let masked = rows.restrict(Tensor::zeros([2, 13], (Kind::Float, Device::Cpu)));
        let finite = |r: i64| -> Vec<i64> {
            (0..13)
                .filter(|&t| masked.double_value(&[r, t]).is_finite())
                .collect()
        };
        assert_eq!(finite(0), vec![6, 8]);
        assert_eq!(finite(1), allowed(&g, START));
        rows.continue_rows(&[0, 0, 1], &[6, 8, 2]);
        assert_eq!(rows.states, vec![START, 1, START]);
        rows.keep(&[1]);
        assert_eq!(rows.states, vec![1]);
        assert_eq!(
            rows.trim(vec![vec![4, 11], vec![7]]),
            vec![vec![4], vec![7]]
        );
        let none = Utf8Rows::new(None, 1, Device::Cpu);
        let logits = Tensor::zeros([1, 13], (Kind::Float, Device::Cpu));
        assert_eq!(none.restrict(logits.shallow_clone()), logits);
    }
}
