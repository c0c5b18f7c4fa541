//! Labeled examples: JSONL (`{"text", "text_pair"?, "label"}` per line) or
//! CSV (a header naming `text`, `label` and optionally `text_pair`), a seeded
//! train/validation split, and tokenization into engine inputs.

use anyhow::{Context, bail};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use std::path::Path;

use crate::model::{Encoded, TextTokenizer};

/// One labeled example as read from a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The (first) text.
    pub text: String,
    /// The second text of a pair.
    pub text_pair: Option<String>,
    /// The label as written (numbers and booleans become their text).
    pub label: String,
}

/// A tokenized example with its label index.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Token ids, specials included, cut to the budget.
    pub input: Encoded,
    /// Index into the task's labels.
    pub label: usize,
}

fn label_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Parses JSONL text; `what` names the source in errors. Blank lines are skipped.
pub fn parse_jsonl(text: &str, what: &str) -> anyhow::Result<Vec<Example>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{what}:{}", i + 1);
        let v: serde_json::Value = serde_json::from_str(line).with_context(at)?;
        let field = |k: &str| v.get(k).filter(|x| !x.is_null());
        let text = match field("text") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => bail!("{}: \"text\": expected a string, found {other}", at()),
            None => bail!("{}: \"text\": missing", at()),
        };
        let text_pair = match field("text_pair") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(other) => bail!("{}: \"text_pair\": expected a string, found {other}", at()),
            None => None,
        };
        let label = match field("label") {
            Some(l) => label_text(l).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: \"label\": expected a string, number or boolean, found {l}",
                    at()
                )
            })?,
            None => bail!("{}: \"label\": missing", at()),
        };
        out.push(Example {
            text,
            text_pair,
            label,
        });
    }
    Ok(out)
}

/// Parses CSV with a header row naming `text`, `label` and optionally `text_pair`.
pub fn parse_csv(text: &str, what: &str) -> anyhow::Result<Vec<Example>> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(text.as_bytes());
    let headers = rdr
        .headers()
        .with_context(|| format!("{what}: header"))?
        .clone();
    let col = |name: &str| headers.iter().position(|h| h.trim() == name);
    let (Some(ti), Some(li)) = (col("text"), col("label")) else {
        bail!(
            "{what}: header: expected columns \"text\" and \"label\" (and optionally \"text_pair\"), found {:?}",
            headers.iter().collect::<Vec<_>>()
        );
    };
    let pi = col("text_pair");
    let mut out = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.with_context(|| format!("{what}: record {}", i + 1))?;
        let pair = pi.map(|p| rec[p].to_string()).filter(|s| !s.is_empty());
        out.push(Example {
            text: rec[ti].to_string(),
            text_pair: pair,
            label: rec[li].trim().to_string(),
        });
    }
    Ok(out)
}

/// Reads a data file; `.csv` is CSV, anything else JSONL.
pub fn read_examples(path: &Path) -> anyhow::Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let what = path.display().to_string();
    let ex = if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
    {
        parse_csv(&text, &what)?
    } else {
        parse_jsonl(&text, &what)?
    };
    anyhow::ensure!(!ex.is_empty(), "{what}: no examples");
    Ok(ex)
}

/// Distinct labels, sorted (numerically when every label is an integer).
pub fn label_set(examples: &[Example]) -> Vec<String> {
    let mut l: Vec<String> = examples.iter().map(|e| e.label.clone()).collect();
    l.sort();
    l.dedup();
    if l.iter().all(|x| x.parse::<i64>().is_ok()) {
        l.sort_by_key(|x| x.parse::<i64>().unwrap_or(0));
    }
    l
}

/// Seeded split: a `fraction` of the examples (at least one when there are
/// two or more) goes to validation, the rest to training, both in the
/// shuffled order.
pub fn split(examples: &[Example], fraction: f64, seed: u64) -> (Vec<Example>, Vec<Example>) {
    let mut idx: Vec<usize> = (0..examples.len()).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(seed));
    let mut n_val = (examples.len() as f64 * fraction).round() as usize;
    if fraction > 0.0 && n_val == 0 && examples.len() >= 2 {
        n_val = 1;
    }
    let n_val = n_val.min(examples.len());
    let val = idx[..n_val].iter().map(|&i| examples[i].clone()).collect();
    let train = idx[n_val..].iter().map(|&i| examples[i].clone()).collect();
    (train, val)
}

/// Tokenizes examples for a task with label names `labels`; texts are cut
/// (longest first) to `max_tokens`, specials included.
pub fn encode(
    tok: &TextTokenizer,
    examples: &[Example],
    labels: &[String],
    max_tokens: usize,
    what: &str,
) -> anyhow::Result<Vec<Sample>> {
    examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let label = labels.iter().position(|l| *l == e.label).ok_or_else(|| {
                anyhow::anyhow!(
                    "{what}: example {}: label {:?} is not one of the task's labels {labels:?}",
                    i + 1,
                    e.label
                )
            })?;
            let input = tok
                .encode(&e.text, e.text_pair.as_deref(), max_tokens, true)
                .with_context(|| format!("{what}: example {}", i + 1))?;
            Ok(Sample { input, label })
        })
        .collect()
}
