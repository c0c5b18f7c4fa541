//! Text → token ids, with the model's own special tokens, and truncation to a
//! per-request budget (the budget depends on the task's prompt length, so it
//! cannot live in the tokenizer file).

use std::path::Path;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::utils::truncation::{
    TruncationDirection, TruncationParams, TruncationStrategy, truncate_encodings,
};
use tokenizers::{Encoding, PostProcessor, Tokenizer};

use super::ModelError;

/// One tokenized input: `[CLS] text [SEP] (pair [SEP])` or the RoBERTa form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// Where the second text's segment starts (just after the separator that
    /// closes the first text), so templates can put virtual tokens between
    /// the two texts. `None` for a single text.
    pub pair_start: Option<usize>,
}

impl Encoded {
    /// Number of tokens, specials included.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when there are no tokens at all (never produced by [`TextTokenizer`]).
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Why a text could not be turned into a row.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error(
        "input is {found} tokens but at most {max} fit next to this task's prompt; shorten it or set truncate"
    )]
    TooLong { found: usize, max: usize },
    #[error("input text is empty (nothing but whitespace or control characters)")]
    Empty,
    #[error("tokenizer failed: {0}")]
    Tokenizer(String),
}

/// The model's tokenizer with padding and truncation switched off: we batch
/// and truncate ourselves.
pub struct TextTokenizer {
    inner: Tokenizer,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`, or builds a BERT WordPiece tokenizer from
    /// `vocab.txt` when that is all there is.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let json = dir.join("tokenizer.json");
        let vocab = dir.join("vocab.txt");
        let mut inner = if json.is_file() {
            Tokenizer::from_file(&json)
                .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", json.display())))?
        } else if vocab.is_file() {
            Self::bert_from_vocab(dir, &vocab)?
        } else {
            return Err(ModelError::Missing(format!(
                "tokenizer: expected {} or {}, found neither",
                json.display(),
                vocab.display()
            )));
        };
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(TextTokenizer { inner })
    }

    fn bert_from_vocab(dir: &Path, vocab: &Path) -> Result<Tokenizer, ModelError> {
        let lowercase = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("do_lower_case").and_then(|b| b.as_bool()))
            .unwrap_or(true);
        let wp = WordPiece::from_file(&vocab.to_string_lossy())
            .unk_token("[UNK]".into())
            .build()
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", vocab.display())))?;
        let mut tok = Tokenizer::new(wp);
        let id = |t: &str| {
            tok.token_to_id(t).ok_or_else(|| {
                ModelError::Tokenizer(format!("{}: special token {t} missing", vocab.display()))
            })
        };
        let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
        tok.with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)));
        tok.with_pre_tokenizer(Some(BertPreTokenizer));
        tok.with_post_processor(Some(BertProcessing::new(
            ("[SEP]".into(), sep),
            ("[CLS]".into(), cls),
        )));
        Ok(tok)
    }

    /// How many special tokens the model adds around one text or a pair.
    pub fn added_tokens(&self, is_pair: bool) -> usize {
        self.inner
            .get_post_processor()
            .map(|p| p.added_tokens(is_pair))
            .unwrap_or(0)
    }

    /// Tokenizes a text (or pair). `max_len` bounds the result, specials
    /// included; with `truncate` the texts are cut longest-first to fit,
    /// otherwise an over-long input is an error.
    pub fn encode(
        &self,
        text: &str,
        pair: Option<&str>,
        max_len: usize,
        truncate: bool,
    ) -> Result<Encoded, TokenizeError> {
        if text.trim().is_empty() || pair.is_some_and(|p| p.trim().is_empty()) {
            return Err(TokenizeError::Empty);
        }
        let tk = |e: tokenizers::Error| TokenizeError::Tokenizer(e.to_string());
        let a = self.inner.encode(text, false).map_err(tk)?;
        let b = match pair {
            Some(p) => Some(self.inner.encode(p, false).map_err(tk)?),
            None => None,
        };
        // Text that normalizes to nothing (NUL or other control characters
        // only) is empty too, as whitespace-only text is.
        if a.is_empty() || b.as_ref().is_some_and(|b| b.is_empty()) {
            return Err(TokenizeError::Empty);
        }
        let added = self.added_tokens(b.is_some());
        let found = a.len() + b.as_ref().map_or(0, |b| b.len()) + added;
        let (a, b) = if found > max_len {
            if !truncate || max_len <= added + usize::from(b.is_some()) {
                return Err(TokenizeError::TooLong {
                    found,
                    max: max_len,
                });
            }
            let params = TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_len - added,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            };
            truncate_encodings(a, b, &params).map_err(tk)?
        } else {
            (a, b)
        };
        let a_len = a.len();
        let is_pair = b.is_some();
        let enc: Encoding = self.inner.post_process(a, b, true).map_err(tk)?;
        // The first text starts at the first non-special token; its segment
        // ends with the one special token that follows it.
        let pair_start = if is_pair {
            let special = enc.get_special_tokens_mask();
            special
                .iter()
                .position(|&s| s == 0)
                .map(|start| (start + a_len + 1).min(enc.len()))
        } else {
            None
        };
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            type_ids: enc.get_type_ids().to_vec(),
            pair_start,
        })
    }
}
