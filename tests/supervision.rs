//! Supervision of the inference thread and the store poller (issue 13
//! point 9): a dead worker fails readiness with the reason, shows in the
//! metrics, and stops the server with an error (the binary then exits
//! non-zero: tests/server_process.rs). The component gauges are
//! process-wide, so these tests take turns.

mod server_support;

use std::time::Duration;

use serde_json::{Value, json};
use server_support::*;

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits for `/ready` to say `failed` (it does within a second or two of
/// the death; 5 s is a hang guard), then checks the reason, the component
/// gauge, and that the server stops with the reason as its error.
async fn assert_failed_and_stops(s: Running, component: &str, reason: &str) {
    let mut ready = Value::Null;
    for _ in 0..100 {
        let resp = s.get("/ready").await;
        let status = resp.status();
        ready = resp.json().await.unwrap();
        if ready["status"] == "failed" {
            assert_eq!(status, 503);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ready["status"], "failed", "{ready}");
    assert!(
        ready["reason"].as_str().unwrap().contains(reason),
        "{ready}"
    );
    let metrics = s.get("/metrics").await.text().await.unwrap();
    let gauge = format!("softprompt_component_up{{component=\"{component}\"}} 0");
    assert!(metrics.contains(&gauge), "{metrics}");
    let err = s
        .server
        .wait()
        .await
        .expect_err("a failed server stops with an error");
    assert!(err.to_string().contains(reason), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_inference_thread_fails_readiness_and_stops_the_server() {
    let _turn = TURN.lock().await;
    let store = store_with(&["pt_random_2"]);
    let mut f = flags(store.path());
    f.extend(["--faults", "worker-panic-after=1"].map(String::from));
    let s = start(&f).await;
    assert_eq!(
        s.classify("pt_random_2", &json!({"inputs": "ok"}))
            .await
            .status(),
        200
    );
    // The second batch kills the thread; the request is answered, not hung.
    let resp = s.classify("pt_random_2", &json!({"inputs": "ok"})).await;
    assert_eq!(resp.status(), 503);
    assert_failed_and_stops(s, "inference", "inference thread panicked").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_store_poller_fails_readiness_and_stops_the_server() {
    let _turn = TURN.lock().await;
    let store = store_with(&["pt_random_2"]);
    let mut f = flags(store.path());
    f.extend(["--faults", "poller-panic", "--sync-interval-ms", "100"].map(String::from));
    let s = start(&f).await;
    assert_failed_and_stops(s, "store_poller", "store poller panicked").await;
}
