//! The server under hostile or extreme traffic (issue 13): idle and slow
//! connections past the bound, a burst against a full server, strict
//! request shapes, admin login guessing, request ids, dying workers.
//! Each test failed against the server before these fixes.

mod server_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use server_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes (Ok(0) or a reset); `None` if it is still
/// open after `within` (a hang guard, not a timing assertion).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(
            within.saturating_sub(started.elapsed()),
            stream.read(&mut buf),
        )
        .await
        {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_past_the_bound_are_closed_and_clients_still_served() {
    let store = store_with(&["pt_random_2"]);
    let mut f = flags(store.path());
    f.extend(
        [
            "--max-connections",
            "16",
            "--header-timeout-ms",
            "1000",
            "--idle-timeout-ms",
            "3000",
            "--body-timeout-ms",
            "1500",
        ]
        .map(String::from),
    );
    let s = start(&f).await;
    let addr = s.server.addr();

    // 24 connections that never send a byte, 8 that send a header slowly
    // (a byte every 200 ms, never finishing), 4 that send a header and a
    // body slowly: 36 > 16.
    let mut idle = Vec::new();
    for _ in 0..24 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut slow_head = Vec::new();
    for _ in 0..8 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow_head.push(c);
    }
    let mut slow_body = Vec::new();
    for _ in 0..4 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(
            b"POST /v1/tasks/pt_random_2/classify HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{",
        )
        .await
        .unwrap();
        slow_body.push(c);
    }
    let dribble = {
        let mut conns: Vec<TcpStream> = slow_head.drain(..).chain(slow_body.drain(..)).collect();
        tokio::spawn(async move {
            for _ in 0..40 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                for c in conns.iter_mut() {
                    let _ = c.write_all(b"x").await;
                }
            }
            conns
        })
    };

    // A normal client is served although the attackers outnumber the bound.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let resp = s.get("/health").await;
    assert_eq!(resp.status(), 200);
    eprintln!(
        "normal client served in {:?} with 36 hostile connections open",
        started.elapsed()
    );
    let body = s
        .classify("pt_random_2", &json!({"inputs": "the movie was great"}))
        .await;
    assert_eq!(body.status(), 200);

    // Every hostile connection is closed by the server, none waits for the
    // client (the idle ones at the latest after the idle timeout).
    let mut conns = dribble.await.unwrap();
    for (i, c) in conns.iter_mut().enumerate() {
        assert!(
            closed_within(c, Duration::from_secs(10)).await.is_some(),
            "slow connection {i} still open"
        );
    }
    for (i, c) in idle.iter_mut().enumerate() {
        assert!(
            closed_within(c, Duration::from_secs(10)).await.is_some(),
            "idle connection {i} still open"
        );
    }
    let metrics = s.get("/metrics").await.text().await.unwrap();
    for reason in ["header_timeout", "shed"] {
        assert!(
            metrics.contains(&format!(
                "softprompt_connections_closed_total{{reason=\"{reason}\"}}"
            )),
            "no connection closed for {reason}:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("softprompt_connections_limited_total"),
        "{metrics}"
    );
}

/// Sends a classify header announcing 50 bytes of body, then 5 of them and
/// nothing more; returns whatever the server answers (10 s hang guard).
async fn body_that_never_ends(s: &Running) -> String {
    let mut c = TcpStream::connect(s.server.addr()).await.unwrap();
    c.write_all(b"POST /v1/tasks/pt_random_2/classify HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 50\r\n\r\n{\"inp")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_gets_408_and_the_request_timeout_covers_the_body() {
    let store = store_with(&["pt_random_2"]);
    let mut f = flags(store.path());
    f.extend(["--body-timeout-ms", "600", "--request-timeout-ms", "30000"].map(String::from));
    let s = start(&f).await;
    let answer = body_that_never_ends(&s).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains(r#""error_type":"body_timeout""#),
        "{answer}"
    );

    // The request deadline runs from the header: a body that is slower than
    // the request timeout is cut at the request timeout (503 timeout).
    let mut f = flags(store.path());
    f.extend(["--body-timeout-ms", "30000", "--request-timeout-ms", "600"].map(String::from));
    let s = start(&f).await;
    let answer = body_that_never_ends(&s).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains(r#""error_type":"timeout""#), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_against_a_full_server_gets_429_with_retry_after() {
    let store = store_with(&["pt_random_2"]);
    let mut f = flags(store.path());
    f.extend(["--max-queued-tokens", "64", "--max-inputs", "4"].map(String::from));
    let s = Arc::new(start(&f).await);
    let pause = s.server.batcher().pause();
    let long = "the movie was great but far too long for its own good ".repeat(3);
    let held = {
        let (s, long) = (s.clone(), long.clone());
        tokio::spawn(async move {
            s.classify(
                "pt_random_2",
                &json!({"inputs": long, "parameters": {"truncate": true}}),
            )
            .await
        })
    };
    s.until("the server is full", |srv| {
        srv.batcher().admitted_tokens() == 64
    })
    .await;

    // 3,000 requests, 256 at a time on their own connections.
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    let url = s.url("/v1/tasks/pt_random_2/classify");
    let mut tasks = Vec::new();
    for i in 0..3000 {
        let (http, gate, url) = (http.clone(), gate.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let _turn = gate.acquire_owned().await.unwrap();
            let started = Instant::now();
            let resp = http
                .post(url)
                .json(&json!({"inputs": format!("request number {i} of the burst")}))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let retry = resp.headers().get("retry-after").is_some();
            let kind: Value = resp.json().await.unwrap();
            (
                started.elapsed(),
                status,
                retry,
                kind["error_type"].as_str().unwrap_or("").to_string(),
            )
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        let (latency, status, retry, kind) = t.await.unwrap();
        assert_eq!((status, retry, kind.as_str()), (429, true, "queue_full"));
        latencies.push(latency);
    }
    latencies.sort();
    eprintln!(
        "3,000 refusals: p50 {:?}, p99 {:?}, max {:?} (2 runtime workers, client in the same process)",
        latencies[1500], latencies[2970], latencies[2999]
    );
    assert_eq!(
        s.server.batcher().waiting(),
        1,
        "nothing of the burst was queued"
    );
    drop(pause);
    assert_eq!(held.await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_shapes_are_strict_and_every_error_is_json() {
    let store = store_with(&["pt_random_2"]);
    let s = start(&flags(store.path())).await;
    let post = |body: &'static str| {
        s.http
            .post(s.url("/v1/tasks/pt_random_2/classify"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for (body, status, kind) in [
        (r#"["a"]"#, 422, "validation"),
        (
            r#"{"inputs": "a", "parameters": [1, "none", true]}"#,
            422,
            "validation",
        ),
        (r#"{"inputs": "a", "parameters": null}"#, 422, "validation"),
        (r#"{"inputs": "\u0000\u0000"}"#, 422, "validation"),
        (r#"{"inputs": "   "}"#, 422, "validation"),
        (r#"{"inputs": ["ok", "\u0000"]}"#, 422, "validation"),
    ] {
        let (got, got_kind, _) = error_of(post(body).await.unwrap()).await;
        assert_eq!((got, got_kind.as_str()), (status, kind), "{body}");
    }
    // NUL-only and whitespace-only inputs are refused with the same message.
    let nul: Value = post(r#"{"inputs": "\u0000"}"#)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let blank: Value = post(r#"{"inputs": " \t"}"#)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(nul["error"], blank["error"]);

    // A task id that is not UTF-8: a JSON 400, not axum's plain text.
    for (method, path) in [
        ("POST", "/v1/tasks/%FF%FE/classify"),
        ("GET", "/v1/tasks/%FF"),
        ("DELETE", "/admin/tasks/%C3%28"),
    ] {
        let resp = s
            .http
            .request(method.parse().unwrap(), s.url(path))
            .bearer_auth(TOKEN)
            .body("{}")
            .send()
            .await
            .unwrap();
        let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
        let (status, kind, _) = error_of(resp).await;
        assert!(ct.starts_with("application/json"), "{path}: {ct}");
        assert_eq!(
            (status, kind.as_str()),
            (400, "bad_path"),
            "{method} {path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_admin_logins_are_counted_and_slow_the_client_down() {
    let store = store_with(&[]);
    let s = start(&flags(store.path())).await;
    let list = |token: &'static str| s.http.get(s.url("/admin/tasks")).bearer_auth(token).send();
    let before = auth_failures(&s).await;
    for _ in 0..softprompt::server::auth::FREE_FAILURES {
        let (status, kind, _) = error_of(list("guess").await.unwrap()).await;
        assert_eq!((status, kind.as_str()), (401, "unauthorized"));
    }
    // In back-off: refused without looking at the token, even the right one.
    let (status, kind, headers) = error_of(list(TOKEN).await.unwrap()).await;
    assert_eq!((status, kind.as_str()), (429, "auth_backoff"));
    let wait: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(wait >= 1);
    assert!(auth_failures(&s).await > before + u64::from(softprompt::server::auth::FREE_FAILURES));
    tokio::time::sleep(Duration::from_millis(wait * 1000 + 100)).await;
    assert_eq!(list(TOKEN).await.unwrap().status(), 200);
    // Success forgets the client's failures.
    assert_eq!(list("guess").await.unwrap().status(), 401);
    assert_eq!(list(TOKEN).await.unwrap().status(), 200);
}

async fn auth_failures(s: &Running) -> u64 {
    let text = s.get("/metrics").await.text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("softprompt_admin_auth_failures_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_carries_a_request_id() {
    let store = store_with(&["pt_random_2"]);
    let s = start(&flags(store.path())).await;
    let resp = s
        .http
        .post(s.url("/v1/tasks/pt_random_2/classify"))
        .header("x-request-id", "client-chose-this")
        .json(&json!({"inputs": "ok"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "client-chose-this");
    for path in ["/health", "/v1/tasks/nope", "/no/such/route"] {
        let resp = s.get(path).await;
        let id = resp
            .headers()
            .get("x-request-id")
            .map(|v| v.to_str().unwrap().to_string());
        assert!(
            id.as_ref().is_some_and(|id| id.len() >= 16),
            "{path}: {id:?}"
        );
    }
}
