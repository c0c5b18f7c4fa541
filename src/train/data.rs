//! Labeled examples: JSONL (`{"text", "text_pair"?, "label"}` per line) or
//! CSV (a header naming `text`, `label` and optionally `text_pair`), read
//! from a local file or from S3 (`s3://bucket/key`, configured by the same
//! `AWS_*` variables as the prompt store), a seeded train/validation split,
//! and tokenization into engine inputs.

use anyhow::{Context, bail};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::model::{Encoded, TextTokenizer};

/// Where a data file is: a local path or an S3 object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// A local (or mounted) file.
    File(PathBuf),
    /// `s3://bucket/key`: S3 or an S3-compatible service, configured by the
    /// `AWS_*` variables the prompt store reads.
    S3 {
        /// Bucket name.
        bucket: String,
        /// Object key.
        key: String,
    },
}

impl FromStr for DataSource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("s3://") {
            let Some((bucket, key)) = rest.split_once('/') else {
                return Err(format!("{s:?}: expected s3://bucket/key"));
            };
            if bucket.is_empty() || key.is_empty() || key.ends_with('/') {
                return Err(format!("{s:?}: expected s3://bucket/key naming one object"));
            }
            if key
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
            {
                return Err(format!("{s:?}: the key has an empty, '.' or '..' segment"));
            }
            return Ok(DataSource::S3 {
                bucket: bucket.to_string(),
                key: key.to_string(),
            });
        }
        if let Some((scheme, _)) = s.split_once("://")
            && !scheme.is_empty()
            && scheme.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(format!(
                "{s:?}: unsupported scheme {scheme:?}; expected a file or s3://bucket/key"
            ));
        }
        if s.is_empty() {
            return Err("the data file name is empty".into());
        }
        Ok(DataSource::File(PathBuf::from(s)))
    }
}

impl fmt::Display for DataSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSource::File(p) => write!(f, "{}", p.display()),
            DataSource::S3 { bucket, key } => write!(f, "s3://{bucket}/{key}"),
        }
    }
}

impl From<PathBuf> for DataSource {
    fn from(p: PathBuf) -> Self {
        DataSource::File(p)
    }
}

impl DataSource {
    /// The file name (last path segment or key segment).
    pub fn file_name(&self) -> String {
        match self {
            DataSource::File(p) => p
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            DataSource::S3 { key, .. } => key.rsplit('/').next().unwrap_or(key).to_string(),
        }
    }

    /// True for a `.csv` name (any case); everything else is JSONL.
    pub fn is_csv(&self) -> bool {
        let name = self.file_name();
        name.rsplit_once('.')
            .is_some_and(|(_, e)| e.eq_ignore_ascii_case("csv"))
    }

    /// The whole file as bytes.
    fn read_bytes(&self) -> anyhow::Result<Vec<u8>> {
        match self {
            DataSource::File(p) => std::fs::read(p).with_context(|| p.display().to_string()),
            DataSource::S3 { bucket, key } => {
                let what = self.to_string();
                let store = crate::store::object::s3_client_from_env(bucket, &what)?;
                let path = object_store::path::Path::from(key.as_str());
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("start the S3 client's runtime")?;
                rt.block_on(async {
                    use object_store::ObjectStoreExt;
                    match store.get(&path).await {
                        Ok(r) => r.bytes().await,
                        Err(e) => Err(e),
                    }
                })
                .map(|b| b.to_vec())
                .map_err(|e| match e {
                    object_store::Error::NotFound { .. } => {
                        anyhow::anyhow!("{what}: no such object")
                    }
                    e => anyhow::Error::new(e).context(format!("{what}: read")),
                })
            }
        }
    }
}

/// True when a text has nothing a tokenizer would keep: empty, or only
/// whitespace and control characters (what the server refuses as empty).
pub fn is_blank(text: &str) -> bool {
    text.chars().all(|c| c.is_whitespace() || c.is_control())
}

/// One labeled example as read from a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The (first) text.
    pub text: String,
    /// The second text of a pair.
    pub text_pair: Option<String>,
    /// The label as written (numbers and booleans become their text).
    pub label: String,
    /// 1-based line of the file it was read from (0: not from a file).
    pub line: usize,
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
        if is_blank(&text) {
            bail!("{}: empty text", at());
        }
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
        if label.trim().is_empty() {
            bail!("{}: empty label", at());
        }
        out.push(Example {
            text,
            text_pair,
            label,
            line: i + 1,
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
    let found = headers.iter().collect::<Vec<_>>();
    let missing: Vec<&str> = ["text", "label"]
        .into_iter()
        .filter(|c| col(c).is_none())
        .collect();
    let (Some(ti), Some(li)) = (col("text"), col("label")) else {
        bail!(
            "{what}:1: header: no {} column; expected columns \"text\" and \"label\" (and optionally \"text_pair\"), found {found:?}",
            missing
                .iter()
                .map(|c| format!("{c:?}"))
                .collect::<Vec<_>>()
                .join(" or ")
        );
    };
    let pi = col("text_pair");
    let mut out = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.with_context(|| format!("{what}: record {}", i + 1))?;
        let line = rec.position().map_or(i + 2, |p| p.line() as usize);
        let pair = pi.map(|p| rec[p].to_string()).filter(|s| !s.is_empty());
        let text = rec[ti].to_string();
        if is_blank(&text) {
            bail!("{what}:{line}: empty text");
        }
        let label = rec[li].trim().to_string();
        if label.is_empty() {
            bail!("{what}:{line}: empty label");
        }
        out.push(Example {
            text,
            text_pair: pair,
            label,
            line,
        });
    }
    Ok(out)
}

/// Reads a data file, local or on S3; a `.csv` name is CSV, anything else
/// JSONL.
pub fn read_examples(src: &DataSource) -> anyhow::Result<Vec<Example>> {
    let what = src.to_string();
    let bytes = src.read_bytes()?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{what}: not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })?;
    let ex = if src.is_csv() {
        parse_csv(&text, &what)?
    } else {
        parse_jsonl(&text, &what)?
    };
    anyhow::ensure!(!ex.is_empty(), "{what}: no examples");
    Ok(ex)
}

/// Refuses training data with fewer than two classes: a classifier has
/// nothing to tell apart.
pub fn ensure_two_classes(examples: &[Example], what: &str) -> anyhow::Result<()> {
    let labels = label_set(examples);
    if labels.len() < 2 {
        bail!(
            "{what}: only one class: every one of the {} examples has the label {:?}; training needs at least two classes",
            examples.len(),
            labels.first().map_or("", String::as_str)
        );
    }
    Ok(())
}

/// Refuses an example whose label is not in `labels`; `whose` says where
/// the labels come from (for the message).
pub fn ensure_known_labels(
    examples: &[Example],
    labels: &[String],
    what: &str,
    whose: &str,
) -> anyhow::Result<()> {
    if let Some(e) = examples.iter().find(|e| !labels.contains(&e.label)) {
        bail!(
            "{}: unknown label {:?}: not among {whose} {labels:?}",
            at_line(what, e),
            e.label
        );
    }
    Ok(())
}

fn at_line(what: &str, e: &Example) -> String {
    if e.line > 0 {
        format!("{what}:{}", e.line)
    } else {
        what.to_string()
    }
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
            let at = || {
                if e.line > 0 {
                    at_line(what, e)
                } else {
                    format!("{what}: example {}", i + 1)
                }
            };
            let label = labels.iter().position(|l| *l == e.label).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: unknown label {:?}: not one of the task's labels {labels:?}",
                    at(),
                    e.label
                )
            })?;
            let input = tok
                .encode(&e.text, e.text_pair.as_deref(), max_tokens, true)
                .with_context(at)?;
            Ok(Sample { input, label })
        })
        .collect()
}
