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
    #[arg(
        long,
        env = "SOFTPROMPT_PROMPTS",
        default_value = "prompts",
        value_name = "DIR|s3://BUCKET/PREFIX"
    )]
    pub prompts: StoreLocation,
    /// How often (ms) the store is polled for tasks that other replicas (or
    /// people) added, replaced or deleted; 0 turns polling off. A task
    /// uploaded through one replica is served by all within about this long.
    /// A new version that does not load leaves the last good one served; a
    /// store that cannot be read leaves everything served as it is, and
    /// /ready reports it.
    #[arg(long, env = "SOFTPROMPT_SYNC_INTERVAL_MS", default_value_t = 2_000)]
    pub sync_interval_ms: u64,
    /// Most bytes of task tensors kept resident (e.g. 512M, 4G, 1073741824):
    /// past it the least recently used unpinned tasks are evicted, and a
    /// request for a task in the store that is not resident loads it first
    /// (so a cold task is slower, never 404). "auto" (the default): a
    /// quarter of the memory this process may use (its cgroup limit, else
    /// the machine's), so a store that fits is held whole as before;
    /// "unlimited": no bound.
    #[arg(
        long,
        env = "SOFTPROMPT_TASK_MEMORY",
        default_value = "auto",
        value_name = "BYTES|auto|unlimited"
    )]
    pub task_memory: TaskMemory,
    /// Load tasks from the store ahead of their first request while they
    /// fit in --task-memory (true, the default: a store that fits is held
    /// whole). false: only pinned tasks are loaded ahead; every other task
    /// loads on its first request, so that behind a balancer that routes
    /// by task id (deploy/nginx-affinity.conf) each replica holds only the
    /// tasks routed to it.
    #[arg(long, env = "SOFTPROMPT_PREFETCH", default_value_t = true, action = clap::ArgAction::Set, value_name = "true|false")]
    pub prefetch: bool,
    /// Tasks never evicted (comma-separated ids); loaded at start.
    #[arg(long, env = "SOFTPROMPT_PIN", value_delimiter = ',')]
    pub pin: Vec<String>,
    /// Most different cold tasks loaded from the store at once; requests for
    /// further cold tasks get 429 `loads_busy` (requests for a task already
    /// loading wait for that load).
    #[arg(long, env = "SOFTPROMPT_MAX_CONCURRENT_LOADS", default_value_t = 16)]
    pub max_concurrent_loads: usize,
    /// Under a memory bound, how long start-up waits for the first full
    /// listing of the store before the replica reports ready anyway (its
    /// pinned tasks loaded, every other task loading on its first request,
    /// the listing finishing in the background). A store that lists within
    /// it starts exactly as without the wait; a store of a million objects
    /// on S3 (a thousand LIST pages) does not hold the replica out of
    /// service meanwhile. Not applied with --strict or without a bound
    /// (--task-memory unlimited and --prefetch true), where every task must
    /// be loaded before ready.
    #[arg(long, env = "SOFTPROMPT_LISTING_WAIT_MS", default_value_t = 5_000)]
    pub listing_wait_ms: u64,
    /// Device of the model: cpu, cuda, cuda:N, metal, metal:N, or auto (the
    /// first CUDA GPU if this build has CUDA support and one is present).
    /// CUDA and Metal need a binary built with `--features cuda` / `metal`.
    #[arg(long, env = "SOFTPROMPT_DEVICE", default_value = "cpu")]
    pub device: crate::model::DeviceSpec,
    /// Which forward serves: auto (our fused kernels on the CPU, the device
    /// backend on a CUDA GPU), device (the device backend: packed rows and
    /// our varlen attention kernel; on the CPU its host build, for testing
    /// what the GPU runs) or candle (candle's ops over a padded grid
    /// everywhere; the reference).
    #[arg(long, env = "SOFTPROMPT_KERNELS", value_enum, default_value_t = crate::engine::Kernels::Auto)]
    pub kernels: crate::engine::Kernels,
    /// Precision of the linear layers: none (f32) or int8 (weights
    /// quantized per output channel at load, activations per row as they
    /// come; our VNNI / AVX2 kernels, chosen at run time). About 2× the
    /// throughput of f32 on a CPU with VNNI, at a small accuracy cost
    /// (BENCHMARKS.md). CPU and --kernels auto only.
    #[arg(long, env = "SOFTPROMPT_QUANTIZE", value_enum, default_value_t = crate::model::Quantize::None)]
    pub quantize: crate::model::Quantize,
    /// Dtype the model's weights are resident in: auto (f16 on a CUDA GPU,
    /// f32 elsewhere), f32, f16 or bf16. 16-bit serves through the device
    /// backend only (`--kernels auto` on a GPU, or `--kernels device`).
    #[arg(long, env = "SOFTPROMPT_DTYPE", value_enum, default_value_t = crate::model::ServeDtype::Auto)]
    pub dtype: crate::model::ServeDtype,
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
    /// batch while the engine is idle. 0 (the default, as Triton's
    /// `max_queue_delay`): a row runs as soon as the engine is free, and
    /// under load batches still form from what queues while the previous
    /// one runs. A wait only delays a lone request: on a 2-CPU Xeon (int8,
    /// 1,000 tasks, BENCHMARKS.md, "The batch wait, measured on a ladder")
    /// 2 ms made the unloaded p50 5.1 ms against 1.8, with no more capacity
    /// (knee 564 against 596 req/s, alternated steps of one run).
    #[arg(long, env = "SOFTPROMPT_BATCH_WAIT_MS", default_value_t = 0)]
    pub batch_wait_ms: u64,
    /// How long (ms) the compute threads stay awake after a batch, spinning
    /// until the next request or this long, before they sleep. A CPU left
    /// idle for 100 ms ran the next forward 1.8× slower (every op alike;
    /// `cargo bench --bench idle`), which is why OpenMP runtimes spin
    /// (Intel's KMP_BLOCKTIME is 200 ms). Costs up to this much CPU time per
    /// compute thread after each batch while traffic is light, and takes
    /// CPU from anything else on the same cores: on 2 CPUs shared with the
    /// load generator, 100 cut requests arriving 100 ms apart from 21.5 to
    /// 16 ms (p50) but slowed back-to-back ones from 13.7 to 15 ms. Off (0)
    /// by default, because the shipped Kubernetes deployment scales on CPU
    /// utilization and caps CPU: spinning reads as load (the autoscaler
    /// would add replicas for idle traffic) and burns the CFS quota the
    /// next forward needs. Worth it where the server has its CPUs to
    /// itself (100 cut the online ladder's p99 at half the knee from 82 to
    /// 35 ms on 2 CPUs).
    #[arg(long, env = "SOFTPROMPT_SPIN_MS", default_value_t = 0)]
    pub spin_ms: u64,
    /// Most tokens admitted and not yet answered (text, virtual tokens and
    /// deep prefix positions of every row). A request reserves an upper
    /// bound of its tokens before it is tokenized; past the bound it gets
    /// 429 with Retry-After at once. Keep it small enough that the engine
    /// works through it well within --request-timeout-ms.
    #[arg(long, env = "SOFTPROMPT_MAX_QUEUED_TOKENS", default_value_t = crate::batch::DEFAULT_MAX_QUEUED_TOKENS)]
    pub max_queued_tokens: usize,
    /// Most inputs in one classify request.
    #[arg(long, env = "SOFTPROMPT_MAX_INPUTS", default_value_t = 64)]
    pub max_inputs: usize,
    /// Largest classify request body, in bytes.
    #[arg(long, env = "SOFTPROMPT_BODY_LIMIT", default_value_t = 1 << 20)]
    pub body_limit: usize,
    /// Largest task upload body (admin routes), in bytes.
    #[arg(long, env = "SOFTPROMPT_UPLOAD_LIMIT", default_value_t = 64 << 20)]
    pub upload_limit: usize,
    /// How long (ms) a classify request may take from its header to its
    /// answer (body read, queue and compute included) before it is
    /// answered 503 `timeout` and its rows are abandoned.
    #[arg(long, env = "SOFTPROMPT_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub request_timeout_ms: u64,
    /// Most open client connections. At the bound, connections idle for
    /// 250 ms or more are closed to make room and new ones wait in the
    /// kernel's backlog. Clamped to the open-files limit (raised to its hard
    /// limit at start) minus a reserve for the store and the model.
    #[arg(long, env = "SOFTPROMPT_MAX_CONNECTIONS", default_value_t = 4_096)]
    pub max_connections: usize,
    /// A request's header must arrive within this many ms of its first byte,
    /// or the connection is closed (slow clients).
    #[arg(long, env = "SOFTPROMPT_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_timeout_ms: u64,
    /// A request's whole body must arrive within this many ms of its header,
    /// or it is answered 408 `body_timeout` and the connection closed.
    #[arg(long, env = "SOFTPROMPT_BODY_TIMEOUT_MS", default_value_t = 60_000)]
    pub body_timeout_ms: u64,
    /// A connection with no request in flight is closed after this many ms
    /// (keep-alive). Keep it above the load balancer's own keep-alive
    /// timeout (nginx: keepalive_timeout 60s upstream) to avoid races.
    #[arg(long, env = "SOFTPROMPT_IDLE_TIMEOUT_MS", default_value_t = 75_000)]
    pub idle_timeout_ms: u64,
    /// Most task uploads parsed and validated at once; further uploads
    /// wait for a turn (up to --request-timeout-ms, then 503), so memory
    /// stays about this many times twice the upload size.
    #[arg(long, env = "SOFTPROMPT_MAX_CONCURRENT_UPLOADS", default_value_t = 2)]
    pub max_concurrent_uploads: usize,
    /// Bearer token of the admin routes. Prefer --admin-token-file or the
    /// SOFTPROMPT_ADMIN_TOKEN variable: a flag is visible to every user in
    /// `ps`. Without a token (here or in
    /// --admin-token-file) the admin routes refuse every request.
    #[arg(
        long,
        env = "SOFTPROMPT_ADMIN_TOKEN",
        hide_env_values = true,
        conflicts_with = "admin_token_file"
    )]
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
    /// Fault injection for tests (see src/faults.rs); empty in production.
    #[arg(long, env = "SOFTPROMPT_FAULTS", hide = true, default_value = "")]
    pub faults: crate::faults::Faults,
    /// Which rows may share a forward pass: mixed (any task; the server's
    /// policy) or one-task (only rows of the oldest row's task). Hidden: it
    /// exists only so that bench/online.sh can measure the one-task
    /// baseline on the real server; one-task only ever serves worse.
    #[arg(
        long,
        env = "SOFTPROMPT_BATCH_POLICY",
        hide = true,
        value_enum,
        default_value_t = crate::batch::BatchPolicy::Mixed
    )]
    pub batch_policy: crate::batch::BatchPolicy,
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
        positive("max-queued-tokens", self.max_queued_tokens)?;
        positive("max-inputs", self.max_inputs)?;
        positive("max-connections", self.max_connections)?;
        positive("max-concurrent-uploads", self.max_concurrent_uploads)?;
        for (name, ms) in [
            ("header-timeout-ms", self.header_timeout_ms),
            ("body-timeout-ms", self.body_timeout_ms),
            ("idle-timeout-ms", self.idle_timeout_ms),
            ("request-timeout-ms", self.request_timeout_ms),
        ] {
            positive(name, ms as usize)?;
        }
        Ok(BatchConfig {
            max_batch_tokens: self.max_batch_tokens,
            max_batch_rows: self.max_batch_size,
            wait: Duration::from_millis(self.batch_wait_ms),
            spin: Duration::from_millis(self.spin_ms),
            max_queued_tokens: self.max_queued_tokens,
            policy: self.batch_policy,
            faults: self.faults.clone(),
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

    /// Deadline of a request body.
    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.body_timeout_ms)
    }

    /// Connection bounds and timeouts, `max_connections` clamped to what
    /// the open-files limit allows.
    pub fn conn_config(&self, open_files: Option<u64>) -> crate::server::connections::ConnConfig {
        // Descriptors the process needs besides client sockets: the model
        // and store files, the store client's sockets, the runtime.
        const RESERVE: u64 = 128;
        // The accept loop counts connections in u32 permits.
        let mut max_connections = self.max_connections.min(u32::MAX as usize);
        if let Some(limit) = open_files {
            let room = limit.saturating_sub(RESERVE).max(1) as usize;
            if max_connections > room {
                tracing::warn!(
                    requested = max_connections,
                    open_files_limit = limit,
                    using = room,
                    "--max-connections exceeds what the open-files limit allows; lowered"
                );
                max_connections = room;
            }
        }
        crate::server::connections::ConnConfig {
            max_connections,
            header_timeout: Duration::from_millis(self.header_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
        }
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
    fn batch_policy_is_mixed_unless_a_benchmark_asks() {
        use crate::batch::BatchPolicy;
        let a = ServeArgs::try_parse_from(["serve"]).unwrap();
        assert_eq!(a.batch_config().unwrap().policy, BatchPolicy::Mixed);
        let a = ServeArgs::try_parse_from(["serve", "--batch-policy", "one-task"]).unwrap();
        assert_eq!(a.batch_config().unwrap().policy, BatchPolicy::OneTask);
        assert!(ServeArgs::try_parse_from(["serve", "--batch-policy", "other"]).is_err());
    }

    #[test]
    fn token_from_file_is_trimmed_and_empty_is_refused() {
        let dir = std::env::temp_dir().join(format!("sp-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "  s3cret\n").unwrap();
        let a = ServeArgs::try_parse_from(["serve", "--admin-token-file", f.to_str().unwrap()])
            .unwrap();
        assert_eq!(a.resolve_admin_token().unwrap().as_deref(), Some("s3cret"));
        std::fs::write(&f, "\n").unwrap();
        assert!(matches!(
            a.resolve_admin_token(),
            Err(ConfigError::EmptyToken)
        ));
        let none = ServeArgs::try_parse_from(["serve"]).unwrap();
        assert!(none.resolve_admin_token().unwrap().is_none());
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn prompts_take_a_directory_or_an_s3_url() {
        let a = ServeArgs::try_parse_from([
            "serve",
            "--prompts",
            "s3://bucket/some/prefix",
            "--sync-interval-ms",
            "0",
        ])
        .unwrap();
        assert_eq!(
            a.prompts,
            StoreLocation::S3 {
                bucket: "bucket".into(),
                prefix: "some/prefix".into()
            }
        );
        assert_eq!(a.sync_interval(), None);
        let err = ServeArgs::try_parse_from(["serve", "--prompts", "gs://bucket/p"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsupported store scheme"), "{err}");
    }

    #[test]
    fn zero_bounds_are_config_errors() {
        for flag in [
            "--max-queued-tokens",
            "--max-connections",
            "--header-timeout-ms",
            "--max-concurrent-uploads",
        ] {
            let a = ServeArgs::try_parse_from(["serve", flag, "0"]).unwrap();
            let err = a.batch_config().unwrap_err().to_string();
            assert!(err.contains(&flag[2..]), "{flag}: {err}");
        }
    }

    #[test]
    fn connections_are_clamped_to_the_open_files_limit() {
        let a = ServeArgs::try_parse_from(["serve", "--max-connections", "5000"]).unwrap();
        assert_eq!(a.conn_config(Some(1024)).max_connections, 1024 - 128);
        assert_eq!(a.conn_config(Some(1 << 20)).max_connections, 5000);
        assert_eq!(a.conn_config(None).max_connections, 5000);
    }
}

/// The `--task-memory` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskMemory {
    /// A quarter of the memory available to the process.
    Auto,
    /// No bound.
    Unlimited,
    /// This many bytes.
    Bytes(u64),
}

impl std::str::FromStr for TaskMemory {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        match t.to_ascii_lowercase().as_str() {
            "auto" => return Ok(TaskMemory::Auto),
            "unlimited" | "none" => return Ok(TaskMemory::Unlimited),
            _ => {}
        }
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            "t" | "tb" | "tib" => 40,
            other => {
                return Err(format!(
                    "{s:?}: unknown unit {other:?}; expected bytes with an optional K, M, G or T (powers of 1024), auto or unlimited"
                ));
            }
        };
        let n: u64 = digits.parse().map_err(|_| {
            format!("{s:?}: expected a number of bytes (e.g. 512M, 4G), auto or unlimited")
        })?;
        n.checked_mul(1u64 << shift)
            .map(TaskMemory::Bytes)
            .ok_or_else(|| format!("{s:?}: too large"))
    }
}

impl TaskMemory {
    /// The byte bound in force (`None`: unbounded), given the memory this
    /// process may use.
    pub fn budget(self, available: Option<u64>) -> Option<u64> {
        match self {
            TaskMemory::Auto => available.map(|a| a / 4),
            TaskMemory::Unlimited => None,
            TaskMemory::Bytes(b) => Some(b),
        }
    }
}

/// The memory this process may use: its cgroup's limit (cgroup v2
/// `memory.max`, or v1 `memory.limit_in_bytes`) when one is set, else the
/// machine's `MemTotal`. `None` when neither can be read.
pub fn available_memory() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let cgroup = read("/sys/fs/cgroup/memory.max")
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
        .and_then(|s| s.trim().parse::<u64>().ok())
        // v1 reports "no limit" as a huge number.
        .filter(|&b| b < 1 << 60);
    let total = read("/proc/meminfo").and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    match (cgroup, total) {
        (Some(c), Some(t)) => Some(c.min(t)),
        (c, t) => c.or(t),
    }
}

#[cfg(test)]
mod task_memory_tests {
    use super::TaskMemory;

    #[test]
    fn task_memory_parses_sizes_and_words() {
        let ok = |s: &str| s.parse::<TaskMemory>().unwrap();
        assert_eq!(ok("auto"), TaskMemory::Auto);
        assert_eq!(ok("Unlimited"), TaskMemory::Unlimited);
        assert_eq!(ok("1048576"), TaskMemory::Bytes(1 << 20));
        assert_eq!(ok("512M"), TaskMemory::Bytes(512 << 20));
        assert_eq!(ok("4GiB"), TaskMemory::Bytes(4 << 30));
        assert_eq!(ok("2 kb"), TaskMemory::Bytes(2048));
        for bad in ["", "-1", "1.5G", "12Q", "G", "99999999999T"] {
            assert!(bad.parse::<TaskMemory>().is_err(), "{bad}");
        }
        assert_eq!(TaskMemory::Auto.budget(Some(8 << 30)), Some(2 << 30));
        assert_eq!(TaskMemory::Unlimited.budget(Some(8 << 30)), None);
    }
}
