//! Wire types of the HTTP API (request and response bodies). They follow
//! the Hugging Face text-classification convention, and their schemas are
//! what `/openapi.json` publishes.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::registry::LoadedTask;

/// Body of `POST /v1/tasks/{task}/classify`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    /// One input or a list of inputs; the answer has one entry per input,
    /// in order, either way.
    pub inputs: Inputs,
    /// Optional scoring parameters.
    #[serde(default, deserialize_with = "object")]
    pub parameters: Parameters,
}

/// Deserializes a struct from a JSON object only: serde's derived structs
/// also accept a sequence of their fields in order (`[1, "none", true]`),
/// which no client means.
fn object<'de, D: serde::Deserializer<'de>, T: serde::de::DeserializeOwned>(
    d: D,
) -> Result<T, D::Error> {
    use serde::de::Error;
    match Value::deserialize(d)? {
        v @ Value::Object(_) => T::deserialize(v).map_err(D::Error::custom),
        other => Err(D::Error::custom(format!(
            "expected a JSON object, found {}",
            json_kind(&other)
        ))),
    }
}

/// The JSON type of a value, for messages.
pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One input or a batch of inputs.
// Deserialized by hand: serde's untagged enums would read `["a", "b"]` as
// one pair (structs accept sequences), and give unhelpful messages.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Inputs {
    /// A single input; still answered as a list of one entry.
    One(Input),
    /// Several inputs, answered in the same order.
    Many(Vec<Input>),
}

impl Inputs {
    /// The inputs as a list (a single input is a list of one).
    pub fn into_vec(self) -> Vec<Input> {
        match self {
            Inputs::One(i) => vec![i],
            Inputs::Many(v) => v,
        }
    }
}

impl<'de> Deserialize<'de> for Inputs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(d)? {
            Value::Array(items) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    Input::from_value(v).map_err(|e| D::Error::custom(format!("inputs[{i}]: {e}")))
                })
                .collect::<Result<_, _>>()
                .map(Inputs::Many),
            v => Input::from_value(v)
                .map(Inputs::One)
                .map_err(|e| D::Error::custom(format!("inputs: {e}"))),
        }
    }
}

/// A text, or a text with a second text (sentence-pair tasks).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Input {
    /// A single text.
    Text(String),
    /// `{"text": …, "text_pair": …}`: a text and an optional second text.
    Pair(TextPair),
}

impl Input {
    fn from_value(v: Value) -> Result<Self, String> {
        match v {
            Value::String(s) => Ok(Input::Text(s)),
            v @ Value::Object(_) => serde_json::from_value(v)
                .map(Input::Pair)
                .map_err(|e| e.to_string()),
            other => Err(format!(
                "expected a string or an object {{\"text\": …, \"text_pair\": …}}, found {}",
                json_type(&other)
            )),
        }
    }

    /// `(text, pair)`.
    pub fn parts(&self) -> (&str, Option<&str>) {
        match self {
            Input::Text(t) => (t, None),
            Input::Pair(p) => (&p.text, p.text_pair.as_deref()),
        }
    }
}

impl<'de> Deserialize<'de> for Input {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Input::from_value(Value::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A text and an optional second text.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TextPair {
    /// The first (or only) text.
    pub text: String,
    /// The second text of a sentence-pair task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_pair: Option<String>,
}

/// Scoring parameters; every field is optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Parameters {
    /// Labels to return per input, best first; null or absent = all.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub top_k: Option<u32>,
    /// How logits become scores (default softmax).
    #[serde(default)]
    pub function_to_apply: FunctionToApply,
    /// Cut inputs that do not fit next to the task's prompt (pairs
    /// longest-first) instead of refusing them with 422.
    #[serde(default)]
    pub truncate: bool,
}

/// Score function over a row's logits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FunctionToApply {
    /// Probabilities over the labels (they sum to 1).
    #[default]
    Softmax,
    /// Independent per-label probabilities (multi-label tasks).
    Sigmoid,
    /// The raw logits.
    None,
}

/// One label's score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LabelScore {
    /// Label name, from the task.
    pub label: String,
    /// Probability (softmax, sigmoid) or raw logit (`none`).
    pub score: f32,
}

/// Answer of classify: per input (in input order), labels sorted by score,
/// descending, cut to `top_k`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
pub struct ClassifyResponse(pub Vec<Vec<LabelScore>>);

/// Public description of a served task.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TaskInfo {
    /// Task id, as in the URL.
    pub id: String,
    /// Content hash; changes with every replace (also sent as
    /// `x-task-version` on classify answers).
    pub version: String,
    /// `shallow`, `deep`, `hybrid` or `none`.
    pub kind: String,
    /// Label names in head order.
    pub labels: Vec<String>,
}

impl From<&LoadedTask> for TaskInfo {
    fn from(t: &LoadedTask) -> Self {
        TaskInfo {
            id: t.id.clone(),
            version: t.version.clone(),
            kind: kind_name(t),
            labels: t.meta.labels.clone(),
        }
    }
}

/// One task of the listing (`GET /v1/tasks`): every task in the store, and
/// whether this replica holds it resident. The version, kind and labels are
/// known for resident tasks only (a cold task is not read for a listing).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TaskEntry {
    /// Task id, as in the URL.
    pub id: String,
    /// Whether this replica holds the task in memory now (a request for a
    /// task that is not resident loads it first).
    pub resident: bool,
    /// Content hash (resident tasks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `shallow`, `deep`, `hybrid` or `none` (resident tasks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Label names in head order (resident tasks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
}

impl From<&LoadedTask> for TaskEntry {
    fn from(t: &LoadedTask) -> Self {
        TaskEntry {
            id: t.id.clone(),
            resident: true,
            version: Some(t.version.clone()),
            kind: Some(kind_name(t)),
            labels: Some(t.meta.labels.clone()),
        }
    }
}

/// Query of `GET /v1/tasks`: one page of the catalog, by id.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    /// Most tasks in the answer (default 1000, at most 10000).
    pub limit: Option<usize>,
    /// Only ids after this one (the last id of the previous page).
    pub after: Option<String>,
}

fn kind_name(t: &LoadedTask) -> String {
    serde_json::to_value(t.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Administrative description of a task: [`TaskInfo`] plus how it runs.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TaskDetails {
    /// Task id, as in the URL.
    pub id: String,
    /// Content hash; changes with every replace.
    pub version: String,
    /// `shallow`, `deep`, `hybrid` or `none`.
    pub kind: String,
    /// Label names in head order.
    pub labels: Vec<String>,
    /// Where the virtual tokens go, e.g. `[P:20] {text}`; absent without a
    /// shallow prompt.
    pub template: Option<String>,
    /// `pooler`, `first` or `mean`.
    pub pooling: String,
    /// Virtual tokens in the input sequence.
    pub shallow_tokens: usize,
    /// Key/value prefix length in every layer.
    pub deep_tokens: usize,
    /// Most text tokens (specials included) an input may have.
    pub text_budget: usize,
    /// Base model the task was made for.
    pub base_model: String,
    /// How the task was made (`prompt-tuning`, `peft:PREFIX_TUNING`, …).
    pub method: String,
}

impl TaskDetails {
    /// Details of `t` served on a model with `config`.
    pub fn new(t: &LoadedTask, config: &crate::model::ModelConfig) -> Self {
        TaskDetails {
            id: t.id.clone(),
            version: t.version.clone(),
            kind: kind_name(t),
            labels: t.meta.labels.clone(),
            template: t.model.shallow.as_ref().map(|s| s.template.to_string()),
            pooling: t.model.pooling.as_str().to_string(),
            shallow_tokens: t.model.shallow_len(),
            deep_tokens: t.model.deep_len(),
            text_budget: t.model.text_budget(config),
            base_model: t.meta.base_model.name.clone(),
            method: t.meta.provenance.method.clone(),
        }
    }
}

/// Answer of `PUT /admin/tasks/{task}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UploadResponse {
    /// True when a served version was replaced (200), false when the task
    /// is new (201).
    pub replaced: bool,
    /// Version served before, when replaced.
    pub previous_version: Option<String>,
    /// The task now served.
    pub task: TaskDetails,
}

/// Every error answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorResponse {
    /// Human-readable reason.
    pub error: String,
    /// Stable machine-readable kind, e.g. `validation`, `queue_full`.
    pub error_type: String,
}

/// Answer of `GET /health`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    /// `ok` once the model is loaded, `loading` before.
    pub status: String,
    /// Name of the loaded model.
    pub model: Option<String>,
    /// Tasks served.
    pub tasks: usize,
}

/// Answer of `GET /ready`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReadyResponse {
    /// True exactly when the status code is 200.
    pub ready: bool,
    /// `ready`, `loading`, `waiting_for_store` (start-up cannot read the
    /// prompt store; retrying), `warming_up`, `draining`, or `failed` (a
    /// worker died; the process exits non-zero shortly).
    pub status: String,
    /// Why the server failed, when `status` is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The prompt store as this replica sees it. A store that becomes
    /// unreachable after start-up does not make the replica unready: it
    /// keeps serving the tasks it has (stale beats nothing) and says so here.
    pub store: StoreStatus,
}

/// The prompt store in `GET /ready`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StoreStatus {
    /// Where tasks are stored: a directory or `s3://bucket/prefix`.
    pub location: String,
    /// Whether the last attempt to read the store succeeded; null before
    /// the first attempt.
    pub reachable: Option<bool>,
    /// Seconds since the store was last read in full; null before that.
    pub last_sync_age_s: Option<f64>,
    /// Why the last attempt to read the store failed; null when it did not.
    pub error: Option<String>,
    /// Tasks whose newest stored version does not load (see the log); an
    /// older version of such a task, if there was one, is still served.
    pub failing_tasks: usize,
    /// Tasks in the store's last full listing; null until the first ends.
    /// Under a memory bound a replica may be ready before that (see
    /// `serve --listing-wait-ms`): every task is served, but `GET /v1/tasks`
    /// answers 503 `catalog_loading` until the listing is complete.
    pub listed_tasks: Option<usize>,
}
