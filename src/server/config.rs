//! `softprompt serve` flags. Every flag can also come from a
//! `SOFTPROMPT_…` environment variable, so a container can be configured
//! without a command line; `softprompt serve` alone serves the default model
//! with the tasks in `prompts/`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::batch::BatchConfig;
use crate::store::StoreLocation;

/// Options of the HTTP server.
#[derive(Debug, Clone, Parser)]
#[command(name = "serve")]
pub struct ServeArgs {
    /// Model directory (Hugging Face layout).
    #[arg(long, env = "SOFTPROMPT_MODEL", default_value = crate::model::DEFAULT_MODEL_DIR)]
    pub model: PathBuf,
    /// Prompt store, where tasks are loaded from and uploads are written: a
    /// directory of native task files and PEFT adapter directories, or
    /// s3://bucket/prefix (S3 or a compatible service) shared by every
    /// replica. S3 is configured by the usual AWS_* variables:
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL
    /// (MinIO, SeaweedFS...; path-style requests) and AWS_ALLOW_HTTP=true for
    /// a plain-HTTP endpoint.
    #[arg(long, env = "SOFTPROMPT_PROMPTS", default_value = "prompts", value_name = "DIR|s3://BUCKET/PREFIX")]
    pub prompts: StoreLocation,
    /// How often (ms) the store is polled for tasks that other replicas (or
    /// people) added, replaced or deleted; 0 turns polling off. A task
    /// uploaded through one replica is served by all within about this long.
    /// A new version that does not load leaves the last good one served; a
    /// store that cannot be read leaves everything served as it is, and
    /// /ready reports it.
    #[arg(long, env = "SOFTPROMPT_SYNC_INTERVAL_MS", default_value_t = 2_000)]
    pub sync_interval_ms: u64,
    /// Device of the model: cpu, cuda, cuda:N, metal, metal:N, or auto (the
    /// first CUDA GPU if this build has CUDA support and one is present).
    /// CUDA and Metal need a binary built with `--features cuda` / `metal`.
    #[arg(long, env = "SOFTPROMPT_DEVICE", default_value = "cpu")]
    pub device: crate::model::DeviceSpec,
    /// Address to listen on.
    #[arg(long, env = "SOFTPROMPT_ADDR", default_value = "0.0.0.0:8080")]
    pub addr: String,
    /// Most padded token positions (rows × longest row) in one forward pass.
    #[arg(long, env = "SOFTPROMPT_MAX_BATCH_TOKENS", default_value_t = 16_384)]
    pub max_batch_tokens: usize,
    /// Most rows in one forward pass.
    #[arg(long, env = "SOFTPROMPT_MAX_BATCH_SIZE", default_value_t = 64)]
    pub max_batch_size: usize,
    /// How long (ms) the oldest waiting row may wait for others to join its
    /// batch when traffic is light.
    #[arg(long, env = "SOFTPROMPT_BATCH_WAIT_MS", default_value_t = 2)]
    pub batch_wait_ms: u64,
    /// Most rows (inputs) waiting for the engine; past it requests get 429.
    #[arg(long, env = "SOFTPROMPT_QUEUE_CAPACITY", default_value_t = 1024)]
    pub queue_capacity: usize,
    /// Most inputs in one classify request.
    #[arg(long, env = "SOFTPROMPT_MAX_INPUTS", default_value_t = 64)]
    pub max_inputs: usize,
    /// Largest classify request body, in bytes.
    #[arg(long, env = "SOFTPROMPT_BODY_LIMIT", default_value_t = 1 << 20)]
    pub body_limit: usize,
    /// Largest task upload body (admin routes), in bytes.
    #[arg(long, env = "SOFTPROMPT_UPLOAD_LIMIT", default_value_t = 64 << 20)]
    pub upload_limit: usize,
    /// How long (ms) a classify request may take, queue included, before it
    /// is answered 503 and its rows are abandoned.
    #[arg(long, env = "SOFTPROMPT_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub request_timeout_ms: u64,
    /// Bearer token of the admin routes. Without a token (here or in
    /// --admin-token-file) the admin routes refuse every request.
    #[arg(long, env = "SOFTPROMPT_ADMIN_TOKEN", hide_env_values = true, conflicts_with = "admin_token_file")]
    pub admin_token: Option<String>,
    /// File holding the admin bearer token (surrounding whitespace ignored).
    #[arg(long, env = "SOFTPROMPT_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Refuse to start when a task in the store does not load (otherwise it
    /// is skipped and logged).
    #[arg(long, env = "SOFTPROMPT_STRICT")]
    pub strict: bool,
    /// Upper bound (ms) on a graceful shutdown: in-flight requests get this
    /// long to finish after SIGTERM/SIGINT.
    #[arg(long, env = "SOFTPROMPT_SHUTDOWN_TIMEOUT_MS", default_value_t = 30_000)]
    pub shutdown_timeout_ms: u64,
    /// How many task ids get their own label in per-task metrics; the rest
    /// are counted as "other", so thousands of tasks cannot blow up the
    /// exposition.
    #[arg(long, env = "SOFTPROMPT_METRICS_MAX_TASKS", default_value_t = 100)]
    pub metrics_max_tasks: usize,
}

/// Why the flags do not describe a server that can start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--admin-token-file {path}: {source}")]
    TokenFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the admin token is empty")]
    EmptyToken,
    #[error("{0}")]
    Invalid(String),
}

impl ServeArgs {
    /// The admin token from the flag, the environment or the file; `None`
    /// when none is configured (admin routes then refuse everything).
    pub fn resolve_admin_token(&self) -> Result<Option<String>, ConfigError> {
        let token = match (&self.admin_token, &self.admin_token_file) {
            (Some(t), _) => t.trim().to_string(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|source| ConfigError::TokenFile {
                    path: path.display().to_string(),
                    source,
                })?
                .trim()
                .to_string(),
            (None, None) => return Ok(None),
        };
        if token.is_empty() {
            return Err(ConfigError::EmptyToken);
        }
        Ok(Some(token))
    }

    /// Batching parameters, checked for consistency.
    pub fn batch_config(&self) -> Result<BatchConfig, ConfigError> {
        let positive = |name: &str, v: usize| {
            if v == 0 {
                Err(ConfigError::Invalid(format!("--{name} must be at least 1")))
            } else {
                Ok(())
            }
        };
        positive("max-batch-tokens", self.max_batch_tokens)?;
        positive("max-batch-size", self.max_batch_size)?;
        positive("queue-capacity", self.queue_capacity)?;
        positive("max-inputs", self.max_inputs)?;
        if self.max_inputs > self.queue_capacity {
            // A request larger than the queue could never be admitted.
            return Err(ConfigError::Invalid(format!(
                "--max-inputs ({}) must not exceed --queue-capacity ({})",
                self.max_inputs, self.queue_capacity
            )));
        }
        Ok(BatchConfig {
            max_batch_tokens: self.max_batch_tokens,
            max_batch_rows: self.max_batch_size,
            wait: Duration::from_millis(self.batch_wait_ms),
            queue_capacity: self.queue_capacity,
        })
    }

    /// Per-request deadline.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// Store poll period; `None` when polling is off.
    pub fn sync_interval(&self) -> Option<Duration> {
        (self.sync_interval_ms > 0).then(|| Duration::from_millis(self.sync_interval_ms))
    }

    /// Bound on graceful shutdown.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_no_arguments() {
        let a = ServeArgs::try_parse_from(["serve"]).unwrap();
        assert_eq!(a.model, PathBuf::from(crate::model::DEFAULT_MODEL_DIR));
        assert_eq!(a.prompts, StoreLocation::Dir(PathBuf::from("prompts")));
        assert_eq!(a.sync_interval(), Some(Duration::from_secs(2)));
        assert!(a.batch_config().is_ok());
    }

    #[test]
    fn token_from_file_is_trimmed_and_empty_is_refused() {
        let dir = std::env::temp_dir().join(format!("sp-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "  s3cret\n").unwrap();
        let a = ServeArgs::try_parse_from(["serve", "--admin-token-file", f.to_str().unwrap()]).unwrap();
        assert_eq!(a.resolve_admin_token().unwrap().as_deref(), Some("s3cret"));
        std::fs::write(&f, "\n").unwrap();
        assert!(matches!(a.resolve_admin_token(), Err(ConfigError::EmptyToken)));
        let none = ServeArgs::try_parse_from(["serve"]).unwrap();
        assert!(none.resolve_admin_token().unwrap().is_none());
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn prompts_take_a_directory_or_an_s3_url() {
        let a = ServeArgs::try_parse_from(["serve", "--prompts", "s3://bucket/some/prefix", "--sync-interval-ms", "0"]).unwrap();
        assert_eq!(
            a.prompts,
            StoreLocation::S3 {
                bucket: "bucket".into(),
                prefix: "some/prefix".into()
            }
        );
        assert_eq!(a.sync_interval(), None);
        let err = ServeArgs::try_parse_from(["serve", "--prompts", "gs://bucket/p"]).unwrap_err().to_string();
        assert!(err.contains("unsupported store scheme"), "{err}");
    }

    #[test]
    fn request_larger_than_queue_is_a_config_error() {
        let a = ServeArgs::try_parse_from(["serve", "--max-inputs", "10", "--queue-capacity", "5"]).unwrap();
        assert!(a.batch_config().is_err());
    }
}
