//! Tokenizers, trained with the `tokenizers` crate on the training corpus and saved as
//! `tokenizer.json` inside every checkpoint.
//!
//! Two kinds: `word` (whitespace words, the N most frequent, the rest `<unk>`: the setting of the
//! PTB literature, Bowman et al. 2016) and `bpe` (byte-level BPE as in GPT-2: no `<unk>` ever, so
//! punctuation, accents and Chinese without spaces all survive, and decoding restores the text).
//! The four special tokens always take ids 0..=3 in this order.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::wordlevel::{WordLevel, WordLevelTrainer};
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::{AddedToken, Tokenizer};

pub const PAD: i64 = 0;
pub const BOS: i64 = 1;
pub const EOS: i64 = 2;
pub const UNK: i64 = 3;
pub const SPECIALS: [&str; 4] = ["<pad>", "<s>", "</s>", "<unk>"];

/// Default vocabulary sizes: BPE 4000 (common words stay whole, rare ones are spelled from
/// pieces that z can carry and the decoder has seen often; the output softmax, most of the
/// compute, is half as wide as at 8000: README, Why the defaults); word level large enough to
/// keep every type of PTB's 10k vocabulary.
pub const DEFAULT_BPE_VOCAB: usize = 4000;
pub const DEFAULT_WORD_VOCAB: usize = 20000;

/// Lines encoded at once: enough to keep every core busy, few enough that the tokenizer's full
/// `Encoding`s of one chunk are small next to the ids kept.
const ENCODE_CHUNK: usize = 8192;

/// Which tokenizer a training run uses.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenizerSpec {
    Word,
    Bpe,
    File(std::path::PathBuf),
}

impl std::str::FromStr for TokenizerSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "word" => Ok(TokenizerSpec::Word),
            "bpe" => Ok(TokenizerSpec::Bpe),
            f if f.ends_with(".json") => Ok(TokenizerSpec::File(f.into())),
            other => {
                bail!("--tokenizer must be `word`, `bpe` or a tokenizer .json file, got `{other}`")
            }
        }
    }
}

pub struct TextTokenizer {
    inner: Tokenizer,
    /// `inner` without its normalizer, for ASCII text, where every Unicode normal form is the
    /// identity: NFC with its alignment bookkeeping was 7% of the time of tokenising a large
    /// English corpus. None where `inner` normalizes otherwise (a loaded file may lowercase).
    ascii: Option<Tokenizer>,
}

/// `tok` without its normalizer where that is a Unicode normal form, which leaves ASCII text as
/// it is; None for any other normalizer (or none).
fn ascii_twin(tok: &Tokenizer) -> Option<Tokenizer> {
    match tok.get_normalizer() {
        Some(
            NormalizerWrapper::NFC(_)
            | NormalizerWrapper::NFD(_)
            | NormalizerWrapper::NFKC(_)
            | NormalizerWrapper::NFKD(_),
        ) => {
            let mut plain = tok.clone();
            plain.with_normalizer(None::<NormalizerWrapper>);
            Some(plain)
        }
        _ => None,
    }
}

fn special_tokens() -> Vec<AddedToken> {
    SPECIALS
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true))
        .collect()
}

/// The training text without special-token strings. The trainers would count a literal `<unk>`
/// (PTB has many) as a word and give it a second id, leaving a hole at 3 and an id past the end
/// of the vocabulary. At encoding time the literal still maps to the special token.
fn scrubbed(lines: &[String]) -> impl Iterator<Item = String> + Send + '_ {
    lines.iter().map(|l| {
        let mut l = l.clone();
        for s in SPECIALS {
            if l.contains(s) {
                l = l.replace(s, " ");
            }
        }
        l
    })
}

impl TextTokenizer {
    /// Trains a tokenizer of the given kind (`Word` or `Bpe`) on `lines`.
    pub fn train(
        spec: &TokenizerSpec,
        lines: &[String],
        vocab_size: Option<usize>,
    ) -> Result<Self> {
        match spec {
            TokenizerSpec::Word => {
                Self::train_word(lines, vocab_size.unwrap_or(DEFAULT_WORD_VOCAB))
            }
            TokenizerSpec::Bpe => Self::train_bpe(lines, vocab_size.unwrap_or(DEFAULT_BPE_VOCAB)),
            TokenizerSpec::File(path) => Self::load(path),
        }
    }

    pub fn train_word(lines: &[String], vocab_size: usize) -> Result<Self> {
        ensure!(
            vocab_size > SPECIALS.len(),
            "--vocab-size must exceed 4, got {vocab_size}"
        );
        let model = WordLevel::builder()
            .unk_token(SPECIALS[UNK as usize].to_string())
            .build()
            .map_err(|e| anyhow!("building the word-level model: {e}"))?;
        let mut inner = Tokenizer::new(model);
        inner.with_pre_tokenizer(Some(WhitespaceSplit));
        let mut trainer: TrainerWrapper = WordLevelTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(0)
            .show_progress(false)
            .special_tokens(special_tokens())
            .build()
            .map_err(|e| anyhow!("building the word-level trainer: {e}"))?
            .into();
        inner
            .train(&mut trainer, scrubbed(lines))
            .map_err(|e| anyhow!("training the word-level tokenizer: {e}"))?;
        Self::checked(inner)
    }

    pub fn train_bpe(lines: &[String], vocab_size: usize) -> Result<Self> {
        ensure!(
            vocab_size > 256 + SPECIALS.len(),
            "--vocab-size for bpe must exceed 260 (the byte alphabet), got {vocab_size}"
        );
        let mut inner = Tokenizer::new(BPE::default());
        inner.with_normalizer(Some(NFC));
        inner.with_pre_tokenizer(Some(ByteLevel::default()));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(special_tokens())
            .initial_alphabet(alphabet)
            .build()
            .into();
        inner
            .train(&mut trainer, scrubbed(lines))
            .map_err(|e| anyhow!("training the BPE tokenizer: {e}"))?;
        Self::checked(inner)
    }

    pub fn load(path: &Path) -> Result<Self> {
        ensure!(
            path.is_file(),
            "tokenizer file {} does not exist",
            path.display()
        );
        let inner = Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("reading tokenizer {}", path.display()))?;
        Self::checked(inner).with_context(|| format!("tokenizer {}", path.display()))
    }

    /// Every tokenizer textvae uses must put the special tokens at ids 0..=3: the model relies on
    /// it. A checked one gets its twin for ASCII text ([`ascii_twin`]).
    fn checked(inner: Tokenizer) -> Result<Self> {
        // Ids must be exactly 0..n: the embedding and output layers have n rows.
        let vocab = inner.get_vocab(true);
        let n = vocab.len();
        let distinct: HashSet<u32> = vocab.values().copied().collect();
        ensure!(
            distinct.len() == n && vocab.values().all(|&id| (id as usize) < n),
            "token ids are not the contiguous range 0..{n}"
        );
        for (id, name) in SPECIALS.iter().enumerate() {
            match inner.token_to_id(name) {
                Some(got) if got as usize == id => {}
                Some(got) => bail!("special token {name} has id {got}, textvae needs {id}"),
                None => bail!("special token {name} is missing: not a textvae tokenizer"),
            }
        }
        let ascii = ascii_twin(&inner);
        Ok(Self { inner, ascii })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| anyhow!("serialising tokenizer: {e}"))?;
        crate::files::write_atomic(path, json.as_bytes())
    }

    /// `word` or `bpe`, read off the model type so it is right for loaded files too.
    pub fn kind(&self) -> &'static str {
        match self.inner.get_model() {
            ModelWrapper::WordLevel(_) => "word",
            ModelWrapper::BPE(_) => "bpe",
            _ => "other",
        }
    }

    pub fn vocab_size(&self) -> i64 {
        self.inner.get_vocab_size(true) as i64
    }

    /// The tokenizer for `text`: the one without a normalizer where that gives the same ids.
    fn for_text(&self, text: &str) -> &Tokenizer {
        match &self.ascii {
            Some(plain) if text.is_ascii() => plain,
            _ => &self.inner,
        }
    }

    /// Token ids of `text`, without `<s>`/`</s>`. The tokenizers crate's `_fast` encodings skip
    /// the offsets into the text, which textvae never reads; the ids are the same.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .for_text(text)
            .encode_fast(text, false)
            .map_err(|e| anyhow!("tokenizing {text:?}: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of each of `texts`, encoded in parallel (the tokenizers crate's batch encoding
    /// on its thread pool); ASCII texts go in a batch of their own where they may skip the
    /// normalizer. An error names the first text that fails.
    pub fn encode_many(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        let Some(plain) = &self.ascii else {
            return self.encode_group(&self.inner, texts.iter().map(String::as_str).collect());
        };
        let (ascii, other): (Vec<_>, Vec<_>) = (0..texts.len()).partition(|&i| texts[i].is_ascii());
        let mut out = vec![Vec::new(); texts.len()];
        for (tok, at) in [(plain, ascii), (&self.inner, other)] {
            let group = at.iter().map(|&i| texts[i].as_str()).collect();
            for (i, ids) in at.into_iter().zip(self.encode_group(tok, group)?) {
                out[i] = ids;
            }
        }
        Ok(out)
    }

    /// The ids of `texts` by `tok` in one batch. An error names the first text that fails.
    fn encode_group(&self, tok: &Tokenizer, texts: Vec<&str>) -> Result<Vec<Vec<u32>>> {
        match tok.encode_batch_fast(texts.clone(), false) {
            Ok(encodings) => Ok(encodings.iter().map(|e| e.get_ids().to_vec()).collect()),
            // Rare (the tokenizers textvae builds accept any text): find which one, and why.
            Err(_) => texts.iter().map(|t| self.encode(t)).collect(),
        }
    }

    /// Hands `f` the index and token ids of each of `texts` in order, encoded in parallel a
    /// chunk at a time, so that a large corpus never holds the tokenizer's full `Encoding`s
    /// (offsets, tokens as strings) of more than one chunk.
    pub fn encode_each(&self, texts: &[String], mut f: impl FnMut(usize, Vec<u32>)) -> Result<()> {
        for (c, chunk) in texts.chunks(ENCODE_CHUNK).enumerate() {
            for (i, ids) in self.encode_many(chunk)?.into_iter().enumerate() {
                f(c * ENCODE_CHUNK + i, ids);
            }
        }
        Ok(())
    }

    /// Text of a generated sequence: stops at the first `</s>`, drops `<pad>` and `<s>`, keeps
    /// `<unk>` visible (PTB writes it literally).
    pub fn decode<T: Copy + Into<i64>>(&self, ids: &[T]) -> Result<String> {
        let ids: Vec<u32> = ids
            .iter()
            .map(|&i| i.into())
            .take_while(|&i| i != EOS)
            .filter(|&i| i != PAD && i != BOS)
            .filter_map(|i| u32::try_from(i).ok())
            .collect();
        let text = self
            .inner
            .decode(&ids, false)
            .map_err(|e| anyhow!("decoding ids: {e}"))?;
        // One sentence is one line: a byte-level model can emit newline or other control
        // bytes, which must not split the output.
        Ok(text
            .split(|c: char| c.is_whitespace() || c.is_control())
            .filter(|w| !w.is_empty())
            .collect::<Vec<_>>()
            .join(" "))
    }

    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(|i| i as i64)
    }

    /// The bytes each id stands for (indexed by id; the special tokens get none), for a
    /// tokenizer that decodes bytes (byte-level BPE, GPT-2's scheme); None for any other, whose
    /// tokens are whole strings.
    pub fn token_bytes(&self) -> Option<Vec<Vec<u8>>> {
        if !matches!(self.inner.get_decoder(), Some(DecoderWrapper::ByteLevel(_))) {
            return None;
        }
        let bytes_of = byte_level_bytes();
        let mut out = vec![Vec::new(); self.vocab_size() as usize];
        for (token, id) in self.inner.get_vocab(true) {
            if (id as usize) < SPECIALS.len() {
                continue;
            }
            // A character outside the byte alphabet is not a byte-level token: no guarantee.
            let bytes: Option<Vec<u8>> = token.chars().map(|c| bytes_of.get(&c).copied()).collect();
            out[id as usize] = bytes?;
        }
        Some(out)
    }
}

/// The byte each character of a byte-level token stands for: GPT-2's `bytes_to_unicode`, which
/// the tokenizers crate keeps private. Printable Latin-1 bytes are their own character; the
/// others, in order, take the characters from U+0100 on. (A test checks it against the crate's
/// alphabet and its encodings.)
fn byte_level_bytes() -> HashMap<char, u8> {
    let mut shifted = 0u32;
    (0u8..=255)
        .filter_map(|b| {
            let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
            let code = if printable {
                u32::from(b)
            } else {
                shifted += 1;
                255 + shifted
            };
            char::from_u32(code).map(|c| (c, b))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn word_level_keeps_specials_first_and_maps_rare_to_unk() {
        let corpus = lines(&["the cat sat", "the dog sat", "the cat ran"]);
        let tok = TextTokenizer::train_word(&corpus, 6).unwrap();
        assert_eq!(tok.vocab_size(), 6);
        assert_eq!(tok.token_to_id("<unk>"), Some(UNK));
        let ids = tok.encode("the cat flew").unwrap();
        assert_eq!(ids.len(), 3);
        assert_eq!(i64::from(ids[2]), UNK);
        assert_eq!(tok.decode(&ids).unwrap(), "the cat <unk>");
        assert_eq!(tok.kind(), "word");
    }

    #[test]
    fn literal_special_tokens_in_the_corpus_do_not_take_a_second_id() {
        let corpus = lines(&["the <unk> sat", "a <unk> ran </s>", "the cat <s> sat"]);
        for tok in [
            TextTokenizer::train_word(&corpus, 100).unwrap(),
            TextTokenizer::train_bpe(&corpus, 300).unwrap(),
        ] {
            let n = tok.vocab_size();
            let ids = tok.encode("the <unk> sat").unwrap();
            assert!(ids.contains(&(UNK as u32)), "{ids:?}");
            assert!(ids.iter().all(|&i| i64::from(i) < n), "{ids:?} vs {n}");
            let mut all: Vec<u32> = tok.inner.get_vocab(true).into_values().collect();
            all.sort();
            assert_eq!(all, (0..n as u32).collect::<Vec<_>>());
        }
    }

    #[test]
    fn bpe_round_trips_punctuation_and_chinese() {
        let corpus = lines(&[
            "Call me Ishmael.",
            "Some years ago—never mind how long precisely—having little or no money.",
            "我们今天去公园吧。",
            "他说：“你好！”",
        ]);
        let tok = TextTokenizer::train_bpe(&corpus, 300).unwrap();
        for s in [
            "Call me Ishmael.",
            "我们去公园。",
            "Hello, world! “quoted” — dash",
        ] {
            let ids = tok.encode(s).unwrap();
            assert!(
                !ids.contains(&(UNK as u32)),
                "byte-level BPE never needs <unk>"
            );
            let mut with_eos: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
            with_eos.push(EOS);
            with_eos.push(PAD);
            assert_eq!(tok.decode(&with_eos).unwrap(), s);
        }
        assert_eq!(tok.kind(), "bpe");
    }

    #[test]
    fn byte_level_tokens_spell_the_bytes_of_the_text() {
        let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        let ours = byte_level_bytes();
        assert_eq!(ours.keys().copied().collect::<HashSet<_>>(), alphabet);
        assert_eq!(ours.values().copied().collect::<HashSet<_>>().len(), 256);
        let corpus = lines(&[
            "我们今天去公园吧。",
            "Café, naïve — “quoted”.",
            "Tab\there 🙂",
        ]);
        let tok = TextTokenizer::train_bpe(&corpus, 300).unwrap();
        let bytes = tok.token_bytes().unwrap();
        assert_eq!(bytes.len(), tok.vocab_size() as usize);
        assert!(bytes[..SPECIALS.len()].iter().all(Vec::is_empty));
        for s in ["我们去公园。", "Café — naïve", "🙂 über"] {
            let spelled: Vec<u8> = tok
                .encode(s)
                .unwrap()
                .iter()
                .flat_map(|&i| bytes[i as usize].clone())
                .collect();
            // The pre-tokenizer's prefix space (GPT-2's), which decoding takes off again.
            assert_eq!(String::from_utf8(spelled).unwrap(), format!(" {s}"));
        }
        let word = TextTokenizer::train_word(&lines(&["a b c"]), 10).unwrap();
        assert!(
            word.token_bytes().is_none(),
            "word tokens are whole strings"
        );
    }

    #[test]
    fn encoding_many_at_once_equals_encoding_one_by_one_with_offsets_or_without() {
        let corpus = lines(&[
            "the cat sat on the mat .",
            "a dog ran",
            "我们今天去公园吧。",
        ]);
        let texts = lines(&[
            "the cat ran",
            "",
            "  spaced   out  ",
            "我们去公园。",
            "<unk> cat",
            // Decomposed and composed: NFC makes them one, so neither may skip the normalizer.
            "cafe\u{301} sat",
            "café sat",
        ]);
        for tok in [
            TextTokenizer::train_word(&corpus, 100).unwrap(),
            TextTokenizer::train_bpe(&corpus, 300).unwrap(),
        ] {
            // Byte-level BPE normalizes (NFC), so its ASCII texts skip the normalizer.
            assert_eq!(tok.ascii.is_some(), tok.kind() == "bpe");
            let one_by_one: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t).unwrap()).collect();
            assert_eq!(tok.encode_many(&texts).unwrap(), one_by_one);
            // The encodings without offsets (and ASCII texts' without the normalizer) give the ids
            // of the crate's full encoding.
            let with_offsets: Vec<Vec<u32>> = texts
                .iter()
                .map(|t| {
                    tok.inner
                        .encode(t.as_str(), false)
                        .unwrap()
                        .get_ids()
                        .to_vec()
                })
                .collect();
            assert_eq!(one_by_one, with_offsets);
            if tok.kind() == "bpe" {
                assert_eq!(
                    one_by_one[5], one_by_one[6],
                    "NFC still applies to the rest"
                );
            }
        }
    }

    #[test]
    fn spec_parsing() {
        assert_eq!(
            "word".parse::<TokenizerSpec>().unwrap(),
            TokenizerSpec::Word
        );
        assert_eq!("bpe".parse::<TokenizerSpec>().unwrap(), TokenizerSpec::Bpe);
        assert!(matches!(
            "v.json".parse::<TokenizerSpec>().unwrap(),
            TokenizerSpec::File(_)
        ));
        assert!("chars".parse::<TokenizerSpec>().is_err());
    }
}
