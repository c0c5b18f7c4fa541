//! Names of the metrics the batcher records (the server exports them; the
//! `metrics` facade makes recording a no-op when no exporter is installed).

/// Histogram: seconds a row waited in the queue before its batch started.
pub const QUEUE_SECONDS: &str = "softprompt_queue_seconds";
/// Gauge: rows waiting in the queue.
pub const QUEUE_ROWS: &str = "softprompt_queue_rows";
/// Histogram: rows per forward pass.
pub const BATCH_ROWS: &str = "softprompt_batch_rows";
/// Histogram: padded positions (rows × longest) per forward pass.
pub const BATCH_TOKENS: &str = "softprompt_batch_tokens";
/// Histogram: distinct tasks per forward pass.
pub const BATCH_TASKS: &str = "softprompt_batch_tasks";
/// Histogram: seconds of compute per forward pass.
pub const BATCH_SECONDS: &str = "softprompt_batch_seconds";
/// Counter: rows discarded before compute because their client hung up.
pub const ROWS_ABANDONED: &str = "softprompt_rows_abandoned_total";
/// Counter: forward passes that failed.
pub const BATCH_FAILURES: &str = "softprompt_batch_failures_total";
/// Gauge: tokens admitted and not yet answered (the admission bound's use).
pub const ADMITTED_TOKENS: &str = "softprompt_admitted_tokens";
