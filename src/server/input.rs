//! The validation layer of classify: body → inputs and parameters →
//! token ids. Runs in the handler (tokenization on the blocking pool),
//! never on the inference thread.

use crate::model::{Encoded, TextTokenizer, TokenizeError};

use super::api::{ClassifyRequest, Input, Parameters};

/// Why a classify request's body or inputs were refused.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// Not JSON at all (syntax error, truncated body).
    #[error("malformed JSON: {0}")]
    Malformed(String),
    /// JSON of the wrong shape: missing `inputs`, unknown or mistyped field,
    /// unknown `function_to_apply`.
    #[error("invalid request: {0}")]
    Schema(String),
    #[error("inputs is an empty list")]
    NoInputs,
    #[error("{count} inputs in one request; at most {max}")]
    TooMany { count: usize, max: usize },
    #[error("parameters.top_k must be at least 1 (or null for all labels)")]
    ZeroTopK,
    #[error("inputs[{index}]: {source}")]
    Tokenize {
        index: usize,
        #[source]
        source: TokenizeError,
    },
}

/// Parses and checks a classify body.
pub fn parse(body: &[u8], max_inputs: usize) -> Result<(Vec<Input>, Parameters), InputError> {
    // A JSON value's type is its first non-blank byte. serde's derived
    // structs would also take an array of the fields in order (`["a"]`).
    let first = body
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if first.is_some_and(|b| *b != b'{') {
        // Not an object: malformed JSON, or JSON of the wrong type?
        return Err(match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(v) => InputError::Schema(format!(
                "the body must be a JSON object, found {}",
                super::api::json_kind(&v)
            )),
            Err(e) => InputError::Malformed(e.to_string()),
        });
    }
    let req: ClassifyRequest = serde_json::from_slice(body).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => InputError::Schema(e.to_string()),
            Category::Syntax | Category::Eof | Category::Io => InputError::Malformed(e.to_string()),
        }
    })?;
    let inputs = req.inputs.into_vec();
    if inputs.is_empty() {
        return Err(InputError::NoInputs);
    }
    if inputs.len() > max_inputs {
        return Err(InputError::TooMany {
            count: inputs.len(),
            max: max_inputs,
        });
    }
    if req.parameters.top_k == Some(0) {
        return Err(InputError::ZeroTopK);
    }
    Ok((inputs, req.parameters))
}

/// Tokens the request's rows may occupy at most, known before tokenizing:
/// WordPiece and byte-level BPE make at most one token per byte of text
/// (plus the special tokens), and no row exceeds the task's text budget.
/// `prompt` is the task's virtual tokens and deep prefix per row.
pub fn token_bound(inputs: &[Input], budget: usize, prompt: usize) -> usize {
    /// [CLS] a [SEP] b [SEP] (BERT) or <s> a </s></s> b </s> (RoBERTa).
    const SPECIALS: usize = 4;
    inputs
        .iter()
        .map(|input| {
            let (text, pair) = input.parts();
            let bytes = text.len() + pair.map_or(0, str::len);
            bytes.saturating_add(SPECIALS).min(budget) + prompt
        })
        .sum()
}

/// Tokenizes every input within `budget` tokens (the task's text budget);
/// the first input that is empty or does not fit (without `truncate`)
/// refuses the request.
pub fn tokenize(
    tokenizer: &TextTokenizer,
    inputs: &[Input],
    budget: usize,
    truncate: bool,
) -> Result<Vec<Encoded>, InputError> {
    inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let (text, pair) = input.parts();
            tokenizer
                .encode(text, pair, budget, truncate)
                .map_err(|source| InputError::Tokenize { index, source })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> InputError {
        parse(body.as_bytes(), 4).unwrap_err()
    }

    #[test]
    fn single_and_many_inputs() {
        let (one, p) = parse(br#"{"inputs": "hello"}"#, 4).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(p.top_k, None);
        let (many, _) = parse(br#"{"inputs": ["a", {"text": "b", "text_pair": "c"}]}"#, 4).unwrap();
        assert_eq!(many.len(), 2);
        assert_eq!(many[1].parts(), ("b", Some("c")));
    }

    #[test]
    fn a_list_of_two_strings_is_two_inputs_not_a_pair() {
        let (v, _) = parse(br#"{"inputs": ["a", "b"]}"#, 4).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].parts(), ("a", None));
        assert!(matches!(
            err(r#"{"inputs": [["a", "b"]]}"#),
            InputError::Schema(_)
        ));
    }

    #[test]
    fn syntax_is_malformed_and_shape_is_schema() {
        assert!(matches!(err(r#"{"inputs": "#), InputError::Malformed(_)));
        assert!(matches!(err("not json"), InputError::Malformed(_)));
        assert!(matches!(err(r#"{}"#), InputError::Schema(_)));
        assert!(matches!(err(r#"{"inputs": 3}"#), InputError::Schema(_)));
        assert!(matches!(
            err(r#"{"inputs": "a", "parameters": {"top_k": -1}}"#),
            InputError::Schema(_)
        ));
        assert!(matches!(
            err(r#"{"inputs": "a", "parameters": {"function_to_apply": "relu"}}"#),
            InputError::Schema(_)
        ));
        assert!(matches!(
            err(r#"{"inputs": "a", "parameters": {"topk": 1}}"#),
            InputError::Schema(_)
        ));
        assert!(matches!(
            err(r#"{"inputs": {"text": "a", "extra": 1}}"#),
            InputError::Schema(_)
        ));
    }

    #[test]
    fn body_and_parameters_must_be_objects() {
        for body in [r#"["a"]"#, r#" [{"text": "a"}]"#, r#""a""#, "3", "null"] {
            let e = err(body);
            assert!(matches!(e, InputError::Schema(_)), "{body}: {e:?}");
            assert!(e.to_string().contains("JSON object"), "{body}: {e}");
        }
        for params in [r#"[1, "none", true]"#, "[]", "null", "5"] {
            let body = format!(r#"{{"inputs": "a", "parameters": {params}}}"#);
            let e = err(&body);
            assert!(matches!(e, InputError::Schema(_)), "{body}: {e:?}");
            assert!(
                e.to_string().contains("expected a JSON object"),
                "{body}: {e}"
            );
        }
        assert!(parse(br#" {"inputs": "a", "parameters": {}}"#, 4).is_ok());
    }

    #[test]
    fn the_token_bound_covers_text_specials_and_prompt_within_the_budget() {
        let (inputs, _) = parse(
            br#"{"inputs": ["abc", {"text": "de", "text_pair": "f"}]}"#,
            4,
        )
        .unwrap();
        assert_eq!(token_bound(&inputs, 100, 5), (3 + 4 + 5) + (3 + 4 + 5));
        assert_eq!(token_bound(&inputs, 6, 5), (6 + 5) * 2);
    }

    #[test]
    fn counts_and_top_k_are_checked() {
        assert!(matches!(err(r#"{"inputs": []}"#), InputError::NoInputs));
        assert!(matches!(
            err(r#"{"inputs": ["a","b","c","d","e"]}"#),
            InputError::TooMany { count: 5, max: 4 }
        ));
        assert!(matches!(
            err(r#"{"inputs": "a", "parameters": {"top_k": 0}}"#),
            InputError::ZeroTopK
        ));
        let (_, p) = parse(br#"{"inputs": "a", "parameters": {"top_k": null, "function_to_apply": "none", "truncate": true}}"#, 4).unwrap();
        assert_eq!(p.top_k, None);
        assert!(p.truncate);
    }
}
