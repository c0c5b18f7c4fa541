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
    let ready = s.get("/ready").await;
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "failed", "{body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("inference thread panicked"),
        "{body}"
    );
    let metrics = s.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("softprompt_component_up{component=\"inference\"} 0"),
        "{metrics}"
    );
    let err = s
        .server
        .wait()
        .await
        .expect_err("a failed server stops with an error");
    assert!(
        err.to_string().contains("inference thread panicked"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_store_poller_fails_readiness_and_stops_the_server() {
    let _turn = TURN.lock().await;
    let store = store_with(&["pt_random_2"]);
    let mut f = flags(store.path());
    f.extend(["--faults", "poller-panic", "--sync-interval-ms", "100"].map(String::from));
    let s = start(&f).await;
    let mut body = Value::Null;
    for _ in 0..100 {
        body = s.get("/ready").await.json().await.unwrap();
        if body["status"] == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(body["status"], "failed", "{body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("store poller panicked"),
        "{body}"
    );
    let metrics = s.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("softprompt_component_up{component=\"store_poller\"} 0"),
        "{metrics}"
    );
    let err = s
        .server
        .wait()
        .await
        .expect_err("a failed server stops with an error");
    assert!(err.to_string().contains("store poller"), "{err}");
}
