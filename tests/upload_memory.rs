//! Issue 13 point 5: concurrent uploads are bounded by a permit and parsed
//! and validated without whole-task copies, so the server's peak memory
//! during N concurrent uploads of S bytes stays under (permits × 2S), and
//! its resident memory returns to its idle level afterwards. Measured on a
//! real `softprompt serve` process from /proc (VmHWM: the peak resident
//! set; VmRSS: now).

mod process_support;

use std::time::Duration;

use candle_core::{Device, Tensor};
use process_support::*;
use softprompt::task::{Task, native, peft};

/// `VmHWM` and `VmRSS` of a process, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Resets the peak resident set (VmHWM) to the current one.
fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

/// A native task file of about `bytes` bytes: the deep fixture with its
/// prefix grown to that size. Parses, then fails validation (more virtual
/// tokens than a task may have), which is the path of every upload.
fn big_task_file(bytes: usize) -> Vec<u8> {
    let mut task: Task =
        peft::read_dir(&root().join("tests/fixtures/adapters/prefix_2"), None).unwrap();
    let width = task.model.deep.as_ref().unwrap().dims()[1];
    let n = bytes / (4 * width);
    task.model.deep = Some(Tensor::randn(0f32, 1.0, (n, width), &Device::Cpu).unwrap());
    let task = Task::new(task.meta, task.model).unwrap();
    native::to_bytes(&task).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_stay_within_the_permits_times_twice_their_size() {
    const N: usize = 8;
    const PERMITS: u64 = 2;
    let body = big_task_file(40 << 20);
    let s = body.len() as u64;

    let store = tempfile::tempdir().unwrap();
    let mut cmd = serve_command(store.path());
    cmd.env("SOFTPROMPT_MODEL", root().join("tests/fixtures/tiny-bert"))
        .env("SOFTPROMPT_PROMPTS", store.path())
        .env("SOFTPROMPT_ADMIN_TOKEN", "t")
        .env("SOFTPROMPT_MAX_CONCURRENT_UPLOADS", PERMITS.to_string());
    let (mut child, base, _logs) = spawn(cmd);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    wait_ready(&http, &base).await;
    let pid = child.id();
    let upload = |body: Vec<u8>| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let resp = http
                .put(format!("{base}/admin/tasks/big"))
                .bearer_auth("t")
                .header("content-type", "application/octet-stream")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap();
            (status, text)
        }
    };
    // One upload first, so allocator pools and buffers that stay are part
    // of the idle level rather than counted as growth.
    let (status, text) = upload(body.clone()).await;
    assert_eq!(status, 422, "{text}");
    assert!(text.contains("max_virtual_tokens"), "{text}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, idle) = memory(pid);
    reset_peak(pid);

    let uploads: Vec<_> = (0..N).map(|_| tokio::spawn(upload(body.clone()))).collect();
    for u in uploads {
        let (status, text) = u.await.unwrap();
        assert_eq!(status, 422, "{text}");
    }
    let (peak, _) = memory(pid);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, after) = memory(pid);
    let mb = |b: u64| b as f64 / f64::from(1 << 20);
    eprintln!(
        "{N} concurrent uploads of {:.1} MB, {PERMITS} permits: idle {:.1} MB, peak {:.1} MB (+{:.1} MB = {:.2} S), after {:.1} MB",
        mb(s),
        mb(idle),
        mb(peak),
        mb(peak.saturating_sub(idle)),
        peak.saturating_sub(idle) as f64 / s as f64,
        mb(after)
    );
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        peak.saturating_sub(idle) <= PERMITS * 2 * s + (16 << 20),
        "peak over permits × 2S"
    );
    assert!(
        after <= idle + (16 << 20),
        "memory did not return to its idle level"
    );
}
