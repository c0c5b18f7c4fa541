//! The `softprompt serve` binary as a child process, for tests and
//! benchmarks that need a real process (exit codes, signals, /proc, its
//! own file-descriptor limit): start it with a clean environment, read its
//! address from its log, wait for it to be ready, stop it.
#![allow(dead_code)] // each test binary that includes this uses a part

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `SOFTPROMPT_*` variable this process has is removed from the
/// child, so only what the test sets applies.
pub fn serve_command(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_softprompt"));
    cmd.arg("serve")
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("SOFTPROMPT_") {
            cmd.env_remove(k);
        }
    }
    // Loopback only, free port: the one setting the tests must override.
    cmd.env("SOFTPROMPT_ADDR", "127.0.0.1:0");
    cmd
}

/// Spawns the server and returns it with its base URL, read from the
/// "listening on" log line; the rest of stderr keeps draining to a channel
/// (and to this process's stderr, each line tagged `[server]`).
pub fn spawn(cmd: Command) -> (Child, String, mpsc::Receiver<String>) {
    spawn_tagged(cmd, "server")
}

/// [`spawn`], tagging the server's log lines `[tag]` (several servers).
pub fn spawn_tagged(mut cmd: Command, tag: &str) -> (Child, String, mpsc::Receiver<String>) {
    let mut child = cmd.spawn().expect("spawn softprompt serve");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let echo = tag.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[{echo}] {line}");
            // A receiver that is gone only stops the forwarding.
            let _ = tx.send(line);
        }
    });
    let base = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("{tag} logs its address"));
        if let Some(at) = line.find("listening on http://") {
            let rest = &line[at + "listening on ".len()..];
            let end = rest
                .find(|c: char| c == '"' || c.is_whitespace())
                .unwrap_or(rest.len());
            break rest[..end].to_string();
        }
    };
    (child, base, rx)
}

pub async fn wait_ready(http: &reqwest::Client, base: &str) {
    for _ in 0..1200 {
        if let Ok(r) = http.get(format!("{base}/ready")).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("server never became ready");
}

pub fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    for _ in 0..1200 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().ok();
    panic!("server did not exit after SIGTERM");
}

pub fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// `"STATUS ERROR_TYPE"` of an answer (`"200 "` for a success), or
/// `"cut off: …"` when the request got no answer at all.
pub async fn outcome(sent: reqwest::Result<reqwest::Response>) -> String {
    match sent {
        Ok(r) => {
            let status = r.status().as_u16();
            let kind = r
                .json::<serde_json::Value>()
                .await
                .ok()
                .and_then(|v| v["error_type"].as_str().map(String::from));
            format!("{status} {}", kind.unwrap_or_default())
        }
        Err(e) => format!("cut off: {e}"),
    }
}
