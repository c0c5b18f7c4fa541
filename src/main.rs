//! The `softprompt` command line. Each subcommand lives in its module; this
//! file only parses arguments and dispatches.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Sets `RAYON_NUM_THREADS` to candle's own default when it is unset, so
/// that the count is worked out once. candle asks for it on every matmul
/// (the task heads run several per batch) and, with the variable unset,
/// `num_cpus::get_physical` reads and parses /proc/cpuinfo each time
/// (16 µs on a 2-CPU VM; `perf` of the server under load showed it). The
/// value is the one candle would compute, so thread counts do not change,
/// except that rayon's global pool (tokenizing) now also uses physical
/// cores, as the compute pool does. The binary's one unsafe block (the
/// library keeps its own to the kernels).
#[allow(unsafe_code)]
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        // SAFETY: called first thing in `main`, before any thread exists
        // (the runtime, the pools and the logger start later), so nothing
        // can read the environment while it changes.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
}

#[derive(Parser)]
#[command(
    name = "softprompt",
    version,
    about = "Serve and train soft-prompt classification tasks on one frozen transformer"
)]
struct Cli {
    /// Log format: text (coloured only on a terminal) or json (one object
    /// per line).
    #[arg(long, global = true, env = "SOFTPROMPT_LOG_FORMAT", value_enum, default_value_t = softprompt::logging::LogFormat::Text)]
    log_format: softprompt::logging::LogFormat,
    /// Same as --log-format json (kept for existing deployments).
    #[arg(long, global = true, env = "SOFTPROMPT_LOG_JSON", hide = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Parsed once at start-up and matched once: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Print what a task file or a directory of task files holds.
    Inspect(softprompt::task::cli::InspectArgs),
    /// Serve the HTTP API (every flag also from a SOFTPROMPT_… variable).
    Serve(softprompt::server::ServeArgs),
    /// Train a soft-prompt task on labeled data (the base model stays frozen).
    Train(softprompt::train::cli::TrainArgs),
    /// Accuracy, macro-F1 and confusion matrix of a task on labeled data.
    Eval(softprompt::train::cli::EvalArgs),
    /// The many-task benchmark workload, for machines without a Rust
    /// toolchain (bench/gpu.sh); not a user command.
    #[command(hide = true)]
    Workload(softprompt::workload::WorkloadArgs),
}

fn main() -> ExitCode {
    pin_thread_count();
    let cli = Cli::parse();
    let format = if cli.log_json {
        softprompt::logging::LogFormat::Json
    } else {
        cli.log_format
    };
    softprompt::logging::init(format);
    let result = match cli.command {
        Command::Inspect(args) => softprompt::task::cli::inspect(args),
        Command::Serve(args) => softprompt::server::run(args),
        Command::Train(args) => softprompt::train::cli::train(args),
        Command::Eval(args) => softprompt::train::cli::eval(args),
        Command::Workload(args) => softprompt::workload::cli(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
