//! The HTTP server, end to end: a real server on 127.0.0.1:0 with the tiny
//! fixture model. Expected scores come from the engine run on single rows
//! (checked against PEFT in tests/parity.rs).

mod server_support;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use serde_json::{Value, json};
use server_support::*;
use softprompt::task::{Task, native};

// ---------------------------------------------------------------- classify

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_scores_match_the_engine_for_every_adapter_kind() {
    classify_scores_match_with(&[]).await;
}

/// The server on candle's ops (the forward a GPU runs) gives the same
/// scores as the fused CPU engine (the reference, itself checked against
/// PEFT in tests/parity.rs, which also runs both forwards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_through_candle_ops_matches_the_fused_engine() {
    classify_scores_match_with(&["--kernels", "candle"]).await;
}

/// The same through the device backend (what a CUDA GPU serves with: the
/// varlen attention kernel, here its host build; one upload, per-row heads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_through_the_device_backend_matches_the_fused_engine() {
    classify_scores_match_with(&["--kernels", "device"]).await;
}

/// `--spin-ms`: compute threads that stay awake after a batch still take
/// the next request at once (they watch the queue, not the clock) and let
/// the server stop, with a spin far longer than the bound: the largest the
/// flag takes (u64::MAX ms, past what the clock can add: no panic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spinning_compute_threads_take_the_next_request_at_once() {
    let name = SHALLOW[0];
    let store = store_with(&[name]);
    let mut f = flags(store.path());
    f.extend(["--spin-ms".to_string(), u64::MAX.to_string()]);
    let s = start(&f).await;
    let input = sample_inputs()[0].json();
    // A hang check, not a speed check: without the queue watch the second
    // request would wait out the spin (forever).
    let bound = std::time::Duration::from_secs(120);
    for i in 0..3 {
        let resp = tokio::time::timeout(bound, s.classify(name, &json!({"inputs": input})))
            .await
            .unwrap_or_else(|_| panic!("request {i} waited out the spin"));
        assert_eq!(resp.status(), 200);
    }
    s.server.shutdown();
    tokio::time::timeout(bound, s.server.wait())
        .await
        .expect("the server stops while its compute threads spin")
        .unwrap();
}

/// 16-bit weights are refused where they cannot serve, with a message
/// that names the flag and the way out.
#[test]
fn sixteen_bit_weights_need_the_device_backend() {
    use softprompt::model::ServeDtype;
    let cpu = candle_core::Device::Cpu;
    let e = ServeDtype::F16
        .resolve(&cpu, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--dtype f16") && e.contains("--kernels device"),
        "{e}"
    );
    assert_eq!(
        ServeDtype::Bf16.resolve(&cpu, true).unwrap(),
        candle_core::DType::BF16
    );
    assert_eq!(
        ServeDtype::Auto.resolve(&cpu, true).unwrap(),
        candle_core::DType::F32
    );
}

async fn classify_scores_match_with(extra: &[&str]) {
    let names: Vec<&str> = SHALLOW.iter().chain(DEEP).copied().collect();
    let store = store_with(&names);
    let mut f = flags(store.path());
    f.extend(extra.iter().map(|s| s.to_string()));
    let s = start(&f).await;
    let reference = Reference::new();
    let inputs = sample_inputs();
    for name in &names {
        let task = fixture_task(name);
        // A single input still gets [[...]].
        let resp = s.classify(name, &json!({"inputs": inputs[0].json()})).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["x-task-version"].to_str().unwrap(),
            task.version
        );
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body.as_array().unwrap().len(), 1);
        reference.check(&task, &inputs[0], &body[0], true);

        // A list: one entry per input, in input order.
        let all: Vec<Value> = inputs.iter().map(In::json).collect();
        let body: Value = s
            .classify(name, &json!({"inputs": all}))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(body.as_array().unwrap().len(), inputs.len());
        for (i, input) in inputs.iter().enumerate() {
            reference.check(&task, input, &body[i], true);
        }

        // Raw logits, sigmoid, top_k.
        let body: Value = s
            .classify(
                name,
                &json!({"inputs": [inputs[2].json()], "parameters": {"function_to_apply": "none"}}),
            )
            .await
            .json()
            .await
            .unwrap();
        reference.check(&task, &inputs[2], &body[0], false);
        let logits = reference.logits(&task, &inputs[3], false);
        let body: Value = s
            .classify(
                name,
                &json!({"inputs": inputs[3].json(), "parameters": {"function_to_apply": "sigmoid", "top_k": 1}}),
            )
            .await
            .json()
            .await
            .unwrap();
        let top = body[0].as_array().unwrap();
        assert_eq!(top.len(), 1);
        let best = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let want = 1.0 / (1.0 + (-best).exp());
        assert!((top[0]["score"].as_f64().unwrap() as f32 - want).abs() <= TOL);
        let best_idx = logits.iter().position(|&l| l == best).unwrap();
        assert_eq!(top[0]["label"], task.meta.labels[best_idx]);
        // top_k null = all labels.
        let body: Value = s
            .classify(
                name,
                &json!({"inputs": "hello", "parameters": {"top_k": null}}),
            )
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(body[0].as_array().unwrap().len(), task.meta.labels.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_cuts_long_inputs_that_are_refused_without_it() {
    let store = store_with(&["pt_random_2", "prefix_2"]);
    let s = start(&flags(store.path())).await;
    let reference = Reference::new();
    let long = "the food was cold and the service slow ".repeat(20);
    for name in ["pt_random_2", "prefix_2"] {
        let task = fixture_task(name);
        for input in [In::text(&long), In::pair(&long, "short pair text")] {
            let (status, kind, _) =
                error_of(s.classify(name, &json!({"inputs": input.json()})).await).await;
            assert_eq!((status, kind.as_str()), (422, "validation"));
            let resp = s
                .classify(name, &json!({"inputs": input.json(), "parameters": {"truncate": true, "function_to_apply": "none"}}))
                .await;
            assert_eq!(resp.status(), 200);
            let body: Value = resp.json().await.unwrap();
            let want = reference.logits(&task, &input, true);
            for e in body[0].as_array().unwrap() {
                let i = task
                    .meta
                    .labels
                    .iter()
                    .position(|l| l == e["label"].as_str().unwrap())
                    .unwrap();
                assert!((e["score"].as_f64().unwrap() as f32 - want[i]).abs() <= TOL);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_error_of_the_contract() {
    let store = store_with(&["pt_text_3"]);
    let mut f = flags(store.path());
    f.extend(["--max-inputs", "4", "--body-limit", "2000"].map(String::from));
    let s = start(&f).await;
    let t = "pt_text_3";
    let raw = |body: &'static str| {
        s.http
            .post(s.url(&format!("/v1/tasks/{t}/classify")))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let cases: Vec<(&str, reqwest::Response, u16, &str)> = vec![
        (
            "malformed JSON",
            raw(r#"{"inputs": "#).await.unwrap(),
            400,
            "malformed_json",
        ),
        (
            "not JSON",
            raw("inputs=hello").await.unwrap(),
            400,
            "malformed_json",
        ),
        (
            "unknown task",
            s.classify("nope", &json!({"inputs": "hi"})).await,
            404,
            "not_found",
        ),
        (
            "body too large",
            s.classify(t, &json!({"inputs": "word ".repeat(1000)}))
                .await,
            413,
            "body_too_large",
        ),
        (
            "empty text",
            s.classify(t, &json!({"inputs": ""})).await,
            422,
            "validation",
        ),
        (
            "blank text",
            s.classify(t, &json!({"inputs": ["ok", "   "]})).await,
            422,
            "validation",
        ),
        (
            "empty pair",
            s.classify(t, &json!({"inputs": {"text": "a", "text_pair": ""}}))
                .await,
            422,
            "validation",
        ),
        (
            "too long",
            s.classify(t, &json!({"inputs": "long text ".repeat(60)}))
                .await,
            422,
            "validation",
        ),
        (
            "too many inputs",
            s.classify(t, &json!({"inputs": ["a", "b", "c", "d", "e"]}))
                .await,
            422,
            "validation",
        ),
        (
            "no inputs",
            s.classify(t, &json!({"inputs": []})).await,
            422,
            "validation",
        ),
        (
            "missing inputs",
            s.classify(t, &json!({"text": "a"})).await,
            422,
            "validation",
        ),
        (
            "input of wrong type",
            s.classify(t, &json!({"inputs": 7})).await,
            422,
            "validation",
        ),
        (
            "top_k zero",
            s.classify(t, &json!({"inputs": "a", "parameters": {"top_k": 0}}))
                .await,
            422,
            "validation",
        ),
        (
            "top_k negative",
            s.classify(t, &json!({"inputs": "a", "parameters": {"top_k": -2}}))
                .await,
            422,
            "validation",
        ),
        (
            "unknown function",
            s.classify(
                t,
                &json!({"inputs": "a", "parameters": {"function_to_apply": "relu"}}),
            )
            .await,
            422,
            "validation",
        ),
        (
            "unknown parameter",
            s.classify(t, &json!({"inputs": "a", "parameters": {"temperature": 2}}))
                .await,
            422,
            "validation",
        ),
        (
            "truncate not a bool",
            s.classify(
                t,
                &json!({"inputs": "a", "parameters": {"truncate": "yes"}}),
            )
            .await,
            422,
            "validation",
        ),
        ("no route", s.get("/v2/nothing").await, 404, "no_route"),
        (
            "wrong method",
            s.get(&format!("/v1/tasks/{t}/classify")).await,
            405,
            "method_not_allowed",
        ),
    ];
    for (what, resp, status, kind) in cases {
        let (got_status, got_kind, _) = error_of(resp).await;
        assert_eq!((got_status, got_kind.as_str()), (status, kind), "{what}");
    }
    // The server still answers normally afterwards.
    assert_eq!(
        s.classify(t, &json!({"inputs": ["a", "b", "c", "d"]}))
            .await
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_counts_tokens_and_refuses_before_tokenizing() {
    // pt_random_2 has 2 virtual tokens and a text budget of 62 (tiny model:
    // 64 positions). A truncated input longer than the budget costs exactly
    // 62 + 2 = 64 tokens; its bound before tokenizing is the same.
    let store = store_with(&["pt_random_2"]);
    let mut f = flags(store.path());
    f.extend(["--max-queued-tokens", "150", "--max-inputs", "4"].map(String::from));
    let s = Arc::new(start(&f).await);
    let reference = Reference::new();
    let task = fixture_task("pt_random_2");
    let long = "the movie was great but far too long for its own good ".repeat(3);
    let pause = s.server.batcher().pause();

    let held = {
        let (s, long) = (s.clone(), long.clone());
        tokio::spawn(async move {
            s.classify(
                "pt_random_2",
                &json!({"inputs": [long, long], "parameters": {"truncate": true}}),
            )
            .await
        })
    };
    s.until("2 long rows queued", |srv| srv.batcher().waiting() == 2)
        .await;
    assert_eq!(s.server.batcher().admitted_tokens(), 128);

    // One row, but 64 more tokens than the 22 left: refused in tokens, not
    // rows. The input is also too long without truncate (a 422 once
    // tokenized): the 429 shows that admission came first.
    let resp = s.classify("pt_random_2", &json!({"inputs": long})).await;
    let (status, kind, headers) = error_of(resp).await;
    assert_eq!((status, kind.as_str()), (429, "queue_full"));
    assert!(
        headers["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u32>()
            .unwrap()
            >= 1
    );
    assert_eq!(s.server.batcher().waiting(), 2);

    // A request that could never fit is a 422, not an endless 429.
    let resp = s
        .classify(
            "pt_random_2",
            &json!({"inputs": [long, long, long], "parameters": {"truncate": true}}),
        )
        .await;
    let (status, kind, _) = error_of(resp).await;
    assert_eq!((status, kind.as_str()), (422, "validation"));

    // A short row still fits.
    let inputs = sample_inputs();
    let last = {
        let s = s.clone();
        let one = inputs[4].json();
        tokio::spawn(async move { s.classify("pt_random_2", &json!({"inputs": one})).await })
    };
    s.until("3 rows queued", |srv| srv.batcher().waiting() == 3)
        .await;
    drop(pause);

    let resp = held.await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body.as_array().unwrap().len(), 2);
    let body: Value = last.await.unwrap().json().await.unwrap();
    reference.check(&task, &inputs[4], &body[0], true);
    s.until("tokens given back", |srv| {
        srv.batcher().admitted_tokens() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_clients_that_hung_up_are_dropped_before_compute() {
    let store = store_with(&["prefix_2"]);
    let s = start(&flags(store.path())).await;
    // Counted from here, whenever the worker gets to see the rows.
    let before = s.server.batcher().stats().abandoned;
    let pause = s.server.batcher().pause();
    let url = s.url("/v1/tasks/prefix_2/classify");
    let client = tokio::spawn(async move {
        client()
            .post(url)
            .json(&json!({"inputs": ["a", "b", "c"]}))
            .send()
            .await
    });
    s.until("3 rows queued", |srv| srv.batcher().waiting() == 3)
        .await;
    client.abort();
    // The server notices the closed connection and drops the handler.
    s.until("handler dropped", |srv| srv.in_flight() == 0).await;
    drop(pause);
    s.until("rows discarded", |srv| {
        srv.batcher().stats().abandoned == before + 3
    })
    .await;
    assert_eq!(s.server.batcher().waiting(), 0);
    // Live clients are unaffected.
    assert_eq!(
        s.classify("prefix_2", &json!({"inputs": "still here"}))
            .await
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_gets_503_and_its_rows_are_abandoned() {
    let store = store_with(&["pt_random_2"]);
    let mut f = flags(store.path());
    f.extend(["--request-timeout-ms", "300"].map(String::from));
    let s = start(&f).await;
    let pause = s.server.batcher().pause();
    let (status, kind, headers) = error_of(
        s.classify("pt_random_2", &json!({"inputs": ["a", "b"]}))
            .await,
    )
    .await;
    assert_eq!((status, kind.as_str()), (503, "timeout"));
    assert!(headers.contains_key("retry-after"));
    drop(pause);
    s.until("rows discarded", |srv| srv.batcher().stats().abandoned == 2)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_over_many_tasks_get_the_scores_of_single_requests() {
    let names: Vec<&str> = SHALLOW.iter().chain(DEEP).copied().collect();
    let store = store_with(&names);
    let s = Arc::new(start(&flags(store.path())).await);
    let reference = Arc::new(Reference::new());
    let inputs = sample_inputs();
    // Expected answers, computed one row at a time.
    let mut expected: HashMap<(usize, usize), Vec<f32>> = HashMap::new();
    let tasks: Vec<_> = names.iter().map(|n| fixture_task(n)).collect();
    for (ti, task) in tasks.iter().enumerate() {
        for (ii, input) in inputs.iter().enumerate() {
            expected.insert((ti, ii), reference.logits(task, input, false));
        }
    }
    let expected = Arc::new(expected);
    let names: Arc<Vec<String>> = Arc::new(names.iter().map(|n| n.to_string()).collect());
    let inputs = Arc::new(inputs);
    let clients = 12;
    let per_client = 15;
    let mut handles = Vec::new();
    for c in 0..clients {
        let (s, expected, names, inputs) =
            (s.clone(), expected.clone(), names.clone(), inputs.clone());
        handles.push(tokio::spawn(async move {
            for r in 0..per_client {
                let ti = (c * 7 + r * 3) % names.len();
                // 1-3 inputs per request, of different lengths.
                let n = 1 + (c + r) % 3;
                let idx: Vec<usize> = (0..n).map(|k| (c + r + k * 2) % inputs.len()).collect();
                let body = json!({
                    "inputs": idx.iter().map(|&i| inputs[i].json()).collect::<Vec<_>>(),
                    "parameters": {"function_to_apply": "none"}
                });
                let resp = s.classify(&names[ti], &body).await;
                assert_eq!(resp.status(), 200);
                let body: Value = resp.json().await.unwrap();
                for (k, &ii) in idx.iter().enumerate() {
                    let want = &expected[&(ti, ii)];
                    let got = body[k].as_array().unwrap();
                    assert_eq!(got.len(), want.len());
                    for e in got {
                        let label = e["label"].as_str().unwrap();
                        let li: usize = label.strip_prefix("LABEL_").unwrap().parse().unwrap();
                        let score = e["score"].as_f64().unwrap() as f32;
                        assert!(
                            (score - want[li]).abs() <= TOL,
                            "task {} input {ii}: {score} vs {}",
                            names[ti],
                            want[li]
                        );
                    }
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_different_tasks_and_lengths_share_one_forward_pass() {
    let names: [&'static str; 4] = ["pt_random_2", "ptune_lstm_3", "prefix_2", "prefix_proj_3"];
    let store = store_with(&names);
    let s = Arc::new(start(&flags(store.path())).await);
    s.until("warm", |srv| srv.batcher().is_warm()).await;
    let inputs = sample_inputs();
    let pause = s.server.batcher().pause();
    let before = s.server.batcher().stats();
    let mut held = Vec::new();
    for (t, name) in names.into_iter().enumerate() {
        let s = s.clone();
        let picked: Vec<In> = inputs.iter().skip(t).step_by(2).cloned().collect();
        let body = json!({"inputs": picked.iter().map(In::json).collect::<Vec<_>>(), "parameters": {"function_to_apply": "none"}});
        held.push((
            name,
            picked,
            tokio::spawn(async move { s.classify(name, &body).await }),
        ));
    }
    let queued: usize = held.iter().map(|(_, p, _)| p.len()).sum();
    s.until("all rows queued", |srv| srv.batcher().waiting() == queued)
        .await;
    drop(pause);
    let reference = Reference::new();
    for (name, picked, h) in held {
        let body: Value = h.await.unwrap().json().await.unwrap();
        let task = fixture_task(name);
        for (i, input) in picked.iter().enumerate() {
            reference.check(&task, input, &body[i], false);
        }
    }
    let after = s.server.batcher().stats();
    assert_eq!(after.rows - before.rows, queued as u64);
    assert_eq!(
        after.batches - before.batches,
        1,
        "one forward pass for four tasks of both kinds"
    );
}

/// `--batch-wait-ms` (0 by default): with a wait, a lone row waits for
/// company while the engine idles, and a full batch ends the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_wait_holds_a_lone_row_until_company_fills_the_batch() {
    let name = SHALLOW[0];
    let store = store_with(&[name]);
    let mut f = flags(store.path());
    let at = f.iter().position(|a| a == "--batch-wait-ms").unwrap();
    // A wait no test outlives: only the full batch (2 rows) can end it.
    f[at + 1] = "600000".into();
    f.extend(["--max-batch-size", "2"].map(String::from));
    let s = Arc::new(start(&f).await);
    s.until("warm", |srv| srv.batcher().is_warm()).await;
    let before = s.server.batcher().stats();
    let inputs = sample_inputs();
    let send = |i: usize| {
        let (s, body) = (s.clone(), json!({"inputs": inputs[i].json()}));
        tokio::spawn(async move { s.classify(name, &body).await })
    };
    let first = send(0);
    s.until("the first row queued", |srv| srv.batcher().waiting() == 1)
        .await;
    let second = send(1);
    for h in [first, second] {
        assert_eq!(h.await.unwrap().status(), 200);
    }
    let after = s.server.batcher().stats();
    assert_eq!(
        (after.batches - before.batches, after.rows - before.rows),
        (1, 2),
        "the lone row waited and rode with the next"
    );
}

// ---------------------------------------------------------------- tasks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_listing_describes_served_tasks() {
    let store = store_with(&["pt_text_3", "prefix_proj_3"]);
    let s = start(&flags(store.path())).await;
    let list: Value = s.get("/v1/tasks").await.json().await.unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["id"], "prefix_proj_3");
    assert_eq!(list[0]["kind"], "deep");
    assert_eq!(list[0]["version"], fixture_task("prefix_proj_3").version);
    assert_eq!(list[0]["labels"], json!(["LABEL_0", "LABEL_1", "LABEL_2"]));
    assert_eq!(list[1]["id"], "pt_text_3");
    assert_eq!(list[1]["kind"], "shallow");
    // Everything is resident (no --task-memory bound reached); the listing
    // says so, the task's own description is the rest of its entry.
    assert!(list.iter().all(|t| t["resident"] == json!(true)));
    let one: Value = s.get("/v1/tasks/pt_text_3").await.json().await.unwrap();
    let mut entry = list[1].clone();
    entry.as_object_mut().unwrap().remove("resident");
    assert_eq!(one, entry);
    let (status, kind, _) = error_of(s.get("/v1/tasks/absent").await).await;
    assert_eq!((status, kind.as_str()), (404, "not_found"));
}

// ---------------------------------------------------------------- admin

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_need_the_bearer_token() {
    let store = store_with(&["pt_random_2"]);
    let s = start(&flags(store.path())).await;
    let attempts = [
        None,
        Some("Bearer wrong"),
        Some("Basic dGVzdA=="),
        Some(TOKEN),
    ];
    for (i, auth) in attempts.into_iter().enumerate() {
        // Each kind of attempt from its own loopback address: failed logins
        // slow their client down after a few (tests/hardening.rs), and
        // three per client stay below that.
        let http = reqwest::Client::builder()
            .no_proxy()
            .local_address(std::net::IpAddr::from([127, 0, 0, 2 + i as u8]))
            .build()
            .unwrap();
        let mut reqs = vec![
            http.get(s.url("/admin/tasks")),
            http.delete(s.url("/admin/tasks/pt_random_2")),
            http.put(s.url("/admin/tasks/x"))
                .header("content-type", "application/octet-stream")
                .body("junk"),
        ];
        for r in reqs.drain(..) {
            let r = match auth {
                Some(a) => r.header("authorization", a),
                None => r,
            };
            let (status, kind, headers) = error_of(r.send().await.unwrap()).await;
            assert_eq!((status, kind.as_str()), (401, "unauthorized"), "{auth:?}");
            assert_eq!(headers["www-authenticate"], "Bearer");
        }
    }
    // Nothing was deleted by the refused requests; the right token works.
    let list: Value = s
        .http
        .get(s.url("/admin/tasks"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list[0]["id"], "pt_random_2");
    assert_eq!(list[0]["shallow_tokens"], 5);
    assert_eq!(list[0]["deep_tokens"], 0);
    assert_eq!(list[0]["method"], "peft:PROMPT_TUNING");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_admin_api_is_closed_and_a_token_file_opens_it() {
    let store = store_with(&["pt_random_2"]);
    let mut f = flags(store.path());
    let at = f.iter().position(|a| a == "--admin-token").unwrap();
    f.drain(at..at + 2);
    let closed = start(&f).await;
    for auth in [
        None,
        Some(format!("Bearer {TOKEN}")),
        Some("Bearer ".to_string()),
    ] {
        let mut r = closed.http.get(closed.url("/admin/tasks"));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        let (status, kind, _) = error_of(r.send().await.unwrap()).await;
        assert_eq!((status, kind.as_str()), (401, "admin_disabled"));
    }
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "from-a-file\n").unwrap();
    f.extend([
        "--admin-token-file".to_string(),
        token_file.to_str().unwrap().to_string(),
    ]);
    let open = start(&f).await;
    let ok = open
        .http
        .get(open.url("/admin/tasks"))
        .bearer_auth("from-a-file")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let wrong = open
        .http
        .get(open.url("/admin/tasks"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_native_and_peft_then_delete() {
    let store = store_with(&[]);
    let s = start(&flags(store.path())).await;
    let reference = Reference::new();
    let input = In::pair("is it good?", "it is");

    // PEFT adapter as multipart, with label names.
    let resp = s
        .put_adapter("sent", "pt_text_3", Some(&["neg", "neu", "pos"]))
        .await;
    assert_eq!(resp.status(), 201);
    let up: Value = resp.json().await.unwrap();
    assert_eq!(up["replaced"], false);
    assert_eq!(up["task"]["id"], "sent");
    assert_eq!(up["task"]["labels"], json!(["neg", "neu", "pos"]));
    let v1 = up["task"]["version"].as_str().unwrap().to_string();
    assert_eq!(s.version("sent").await, v1);
    // Stored durably as a native file before the answer.
    let stored = native::read_file(&store.path().join("sent.safetensors")).unwrap();
    assert_eq!(stored.version, v1);
    let resp = s.classify("sent", &json!({"inputs": input.json()})).await;
    assert_eq!(resp.headers()["x-task-version"].to_str().unwrap(), v1);
    let body: Value = resp.json().await.unwrap();
    reference.check(&stored, &input, &body[0], true);

    // Replace with a native file of another (deep) task: 200, new version
    // served to the very next request.
    let deep = fixture_task("prefix_proj_3");
    let resp = s.put_native("sent", native::to_bytes(&deep).unwrap()).await;
    assert_eq!(resp.status(), 200);
    let up: Value = resp.json().await.unwrap();
    assert_eq!(up["replaced"], true);
    assert_eq!(up["previous_version"], v1.as_str());
    assert_eq!(up["task"]["kind"], "deep");
    assert_eq!(up["task"]["version"], deep.version.as_str());
    let resp = s.classify("sent", &json!({"inputs": input.json()})).await;
    assert_eq!(
        resp.headers()["x-task-version"].to_str().unwrap(),
        deep.version
    );
    reference.check(&deep, &input, &resp.json::<Value>().await.unwrap()[0], true);

    // Delete: 204, then 404 everywhere, and gone from the store.
    assert_eq!(s.delete("sent").await.status(), 204);
    assert_eq!(
        s.classify("sent", &json!({"inputs": "x"})).await.status(),
        404
    );
    assert_eq!(s.get("/v1/tasks/sent").await.status(), 404);
    assert!(!store.path().join("sent.safetensors").exists());
    let (status, kind, _) = error_of(s.delete("sent").await).await;
    assert_eq!((status, kind.as_str()), (404, "not_found"));
    let (status, _, _) = error_of(s.delete("..%2Fetc").await).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_upload_changes_nothing_served_or_stored() {
    let store = store_with(&["pt_random_2"]);
    let s = start(&flags(store.path())).await;
    let good = native::to_bytes(&fixture_task("ptune_mlp_2")).unwrap();
    assert_eq!(s.put_native("kept", good.clone()).await.status(), 201);

    let before_files = snapshot(store.path());
    let before_list: Value = s.get("/v1/tasks").await.json().await.unwrap();
    let probe = json!({"inputs": ["a b c", {"text": "x", "text_pair": "y"}], "parameters": {"function_to_apply": "none"}});
    let before_scores: Value = s.classify("kept", &probe).await.json().await.unwrap();

    let mut truncated = good.clone();
    truncated.truncate(good.len() / 2);
    // Well-formed files that validation refuses.
    let other_model = {
        let t = fixture_task("ptune_mlp_2");
        let mut meta = t.meta.clone();
        meta.base_model.fingerprint = Some("sha256:0000000000000000".into());
        native::to_bytes(&Task::new(meta, t.model.clone()).unwrap()).unwrap()
    };
    let nan_prompt = {
        let t = fixture_task("ptune_mlp_2");
        let mut model = t.model.clone();
        let sp = model.shallow.as_mut().unwrap();
        sp.embeddings = (sp.embeddings.ones_like().unwrap() * f64::NAN).unwrap();
        native::to_bytes(&Task::new(t.meta.clone(), model).unwrap()).unwrap()
    };
    let put = |id: &str| {
        s.http
            .put(s.url(&format!("/admin/tasks/{id}")))
            .bearer_auth(TOKEN)
    };
    let octet = |id: &str, b: Vec<u8>| {
        put(id)
            .header("content-type", "application/octet-stream")
            .body(b)
    };
    let form = |parts: Vec<(&'static str, Vec<u8>)>| {
        parts
            .into_iter()
            .fold(reqwest::multipart::Form::new(), |f, (n, b)| {
                f.part(n, reqwest::multipart::Part::bytes(b))
            })
    };
    let pt_cfg = std::fs::read(adapter_dir("pt_random_2").join("adapter_config.json")).unwrap();
    let pt_w = std::fs::read(adapter_dir("pt_random_2").join("adapter_model.safetensors")).unwrap();
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "garbage bytes",
            octet("kept", b"not a task".to_vec()),
            422,
            "invalid_task",
        ),
        (
            "truncated file",
            octet("kept", truncated),
            422,
            "invalid_task",
        ),
        ("empty body", octet("kept", Vec::new()), 422, "invalid_task"),
        (
            "bad id",
            octet("..%2Fevil", good.clone()),
            422,
            "invalid_task",
        ),
        (
            "bad id 2",
            octet(".hidden", good.clone()),
            422,
            "invalid_task",
        ),
        (
            "wrong content type",
            put("kept")
                .header("content-type", "text/plain")
                .body(good.clone()),
            415,
            "unsupported_media_type",
        ),
        (
            "no content type",
            put("kept").body(good.clone()),
            415,
            "unsupported_media_type",
        ),
        (
            "task for another model",
            octet("kept", other_model),
            422,
            "invalid_task",
        ),
        (
            "NaN in the prompt",
            octet("kept", nan_prompt),
            422,
            "invalid_task",
        ),
        (
            "missing weights part",
            put("kept").multipart(form(vec![("adapter_config.json", pt_cfg.clone())])),
            422,
            "invalid_upload",
        ),
        (
            "unknown part",
            put("kept").multipart(form(vec![
                ("adapter_config.json", pt_cfg.clone()),
                ("weights.bin", pt_w.clone()),
            ])),
            422,
            "invalid_upload",
        ),
        (
            "labels not a list",
            put("kept").multipart(form(vec![
                ("adapter_config.json", pt_cfg.clone()),
                ("adapter_model.safetensors", pt_w.clone()),
                ("labels", b"{\"a\": 1}".to_vec()),
            ])),
            422,
            "invalid_upload",
        ),
        (
            "wrong label count",
            put("kept").multipart(form(vec![
                ("adapter_config.json", pt_cfg.clone()),
                ("adapter_model.safetensors", pt_w.clone()),
                ("labels", b"[\"a\", \"b\", \"c\"]".to_vec()),
            ])),
            422,
            "invalid_task",
        ),
        (
            "config that is not JSON",
            put("kept").multipart(form(vec![
                ("adapter_config.json", b"{".to_vec()),
                ("adapter_model.safetensors", pt_w.clone()),
            ])),
            422,
            "invalid_task",
        ),
        (
            "broken multipart",
            put("kept")
                .header("content-type", "multipart/form-data; boundary=XYZ")
                .body("--XYZ\r\nbroken"),
            400,
            "malformed_upload",
        ),
        (
            "new id, garbage",
            octet("fresh", b"\x08\x00\x00\x00\x00\x00\x00\x00{}".to_vec()),
            422,
            "invalid_task",
        ),
    ];
    for (what, req, status, kind) in cases {
        let (got_status, got_kind, _) = error_of(req.send().await.unwrap()).await;
        assert_eq!((got_status, got_kind.as_str()), (status, kind), "{what}");
        assert_eq!(
            snapshot(store.path()),
            before_files,
            "{what}: store changed"
        );
        let list: Value = s.get("/v1/tasks").await.json().await.unwrap();
        assert_eq!(list, before_list, "{what}: served tasks changed");
        let scores: Value = s.classify("kept", &probe).await.json().await.unwrap();
        assert_eq!(scores, before_scores, "{what}: scores changed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_over_the_limit_is_413_and_changes_nothing() {
    let store = store_with(&[]);
    let mut f = flags(store.path());
    f.extend(["--upload-limit", "1000"].map(String::from));
    let s = start(&f).await;
    let big = native::to_bytes(&fixture_task("prefix_proj_3")).unwrap();
    assert!(big.len() > 1000);
    let (status, kind, _) = error_of(s.put_native("big", big).await).await;
    assert_eq!((status, kind.as_str()), (413, "body_too_large"));
    let (status, kind, _) = error_of(s.put_adapter("big", "prefix_proj_3", None).await).await;
    assert_eq!((status, kind.as_str()), (413, "body_too_large"));
    assert!(snapshot(store.path()).is_empty());
    assert_eq!(s.get("/v1/tasks/big").await.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_tasks_survive_a_restart() {
    let store = store_with(&["prefix_2"]);
    let f = flags(store.path());
    let s = start(&f).await;
    assert_eq!(
        s.put_adapter("peft-up", "ptune_lstm_3", Some(&["a", "b", "c"]))
            .await
            .status(),
        201
    );
    assert_eq!(
        s.put_native(
            "native-up",
            native::to_bytes(&fixture_task("pt_text_3")).unwrap()
        )
        .await
        .status(),
        201
    );
    assert_eq!(s.delete("prefix_2").await.status(), 204);
    let probe = json!({"inputs": ["restart me", {"text": "a", "text_pair": "b"}]});
    let mut before = Vec::new();
    for id in ["peft-up", "native-up"] {
        let resp = s.classify(id, &probe).await;
        let version = resp.headers()["x-task-version"]
            .to_str()
            .unwrap()
            .to_string();
        before.push((id, version, resp.json::<Value>().await.unwrap()));
    }
    let list_before: Value = s.get("/v1/tasks").await.json().await.unwrap();
    s.server.shutdown();
    s.server.wait().await.unwrap();

    let s = start(&f).await;
    let list_after: Value = s.get("/v1/tasks").await.json().await.unwrap();
    assert_eq!(list_after, list_before);
    assert_eq!(
        list_after.as_array().unwrap().len(),
        2,
        "the deleted task stays deleted"
    );
    for (id, version, scores) in before {
        let resp = s.classify(id, &probe).await;
        assert_eq!(resp.headers()["x-task-version"].to_str().unwrap(), version);
        assert_eq!(resp.json::<Value>().await.unwrap(), scores);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replace_under_sustained_load_has_no_errors_and_scores_match_the_version_named() {
    let store = store_with(&[]);
    let s = Arc::new(start(&flags(store.path())).await);
    let reference = Arc::new(Reference::new());
    // Two versions of one id, shallow and deep, same label count.
    let a = fixture_task("pt_random_2");
    let b = fixture_task("prefix_2");
    let bytes = [native::to_bytes(&a).unwrap(), native::to_bytes(&b).unwrap()];
    let inputs = Arc::new(sample_inputs());
    let mut want: HashMap<String, Vec<Vec<f32>>> = HashMap::new();
    for t in [&a, &b] {
        want.insert(
            t.version.clone(),
            inputs
                .iter()
                .map(|i| reference.logits(t, i, false))
                .collect(),
        );
    }
    let want = Arc::new(want);
    assert_eq!(s.put_native("swap", bytes[0].clone()).await.status(), 201);

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let seen: Arc<std::sync::Mutex<BTreeSet<String>>> = Default::default();
    let mut clients = Vec::new();
    for c in 0..6 {
        let (s, want, inputs, stop, answered, seen) = (
            s.clone(),
            want.clone(),
            inputs.clone(),
            stop.clone(),
            answered.clone(),
            seen.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut r = 0;
            while !stop.load(Ordering::Relaxed) {
                let idx: Vec<usize> = (0..1 + (c + r) % 3)
                    .map(|k| (c + r + k) % inputs.len())
                    .collect();
                let body = json!({
                    "inputs": idx.iter().map(|&i| inputs[i].json()).collect::<Vec<_>>(),
                    "parameters": {"function_to_apply": "none"}
                });
                let resp = s.classify("swap", &body).await;
                assert!(
                    resp.status().is_success(),
                    "non-2xx under replace: {}",
                    resp.status()
                );
                let version = resp.headers()["x-task-version"]
                    .to_str()
                    .unwrap()
                    .to_string();
                let body: Value = resp.json().await.unwrap();
                let rows = &want[&version];
                for (k, &ii) in idx.iter().enumerate() {
                    for e in body[k].as_array().unwrap() {
                        let li: usize = e["label"]
                            .as_str()
                            .unwrap()
                            .strip_prefix("LABEL_")
                            .unwrap()
                            .parse()
                            .unwrap();
                        let score = e["score"].as_f64().unwrap() as f32;
                        assert!(
                            (score - rows[ii][li]).abs() <= TOL,
                            "version {version}: scores of another version"
                        );
                    }
                }
                seen.lock().unwrap().insert(version);
                answered.fetch_add(1, Ordering::Relaxed);
                r += 1;
            }
        }));
    }
    for round in 0..10 {
        let target = (round + 1) % 2;
        let resp = s.put_native("swap", bytes[target].clone()).await;
        assert_eq!(resp.status(), 200);
        // Every request admitted after the answer uses the new version.
        let resp = s
            .classify("swap", &json!({"inputs": "after the swap"}))
            .await;
        assert_eq!(
            resp.headers()["x-task-version"].to_str().unwrap(),
            [&a, &b][target].version
        );
        // Let the load run against this version for a while.
        let at = answered.load(Ordering::Relaxed);
        until("load continues", || {
            answered.load(Ordering::Relaxed) >= at + 10
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(
        seen.lock().unwrap().len(),
        2,
        "both versions answered under load"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_under_load_lets_admitted_requests_finish() {
    let store = store_with(&["ptune_mlp_2"]);
    let s = Arc::new(start(&flags(store.path())).await);
    let pause = s.server.batcher().pause();
    let held = {
        let s = s.clone();
        tokio::spawn(async move {
            s.classify("ptune_mlp_2", &json!({"inputs": ["one", "two"]}))
                .await
        })
    };
    s.until("rows queued", |srv| srv.batcher().waiting() == 2)
        .await;
    assert_eq!(s.delete("ptune_mlp_2").await.status(), 204);
    assert_eq!(
        s.classify("ptune_mlp_2", &json!({"inputs": "late"}))
            .await
            .status(),
        404
    );
    drop(pause);
    let resp = held.await.unwrap();
    assert_eq!(
        resp.status(),
        200,
        "admitted before the delete: finishes on its version"
    );
    let body: Value = resp.json().await.unwrap();
    let reference = Reference::new();
    reference.check(
        &fixture_task("ptune_mlp_2"),
        &In::text("two"),
        &body[1],
        true,
    );
}

// ---------------------------------------------------------------- start-up, probes, shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_stored_task_is_skipped_or_fatal_with_strict() {
    let store = store_with(&["pt_random_2"]);
    std::fs::write(store.path().join("broken.safetensors"), b"garbage").unwrap();
    let f = flags(store.path());
    let s = start(&f).await;
    let list: Value = s.get("/v1/tasks").await.json().await.unwrap();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["pt_random_2"]);
    let mut strict = f.clone();
    strict.push("--strict".into());
    let err = softprompt::server::Server::start(args(&strict))
        .await
        .err()
        .expect("strict start fails");
    assert!(err.to_string().contains("broken"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_the_model_is_loaded_probes_and_routes_answer_503() {
    use softprompt::server::{routes, state::AppState};
    // The state a server has between binding and the end of loading.
    let store = store_with(&[]);
    let state = Arc::new(AppState::new(
        args(&flags(store.path())),
        Some(TOKEN.into()),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(axum::serve(listener, routes::router(state)).into_future());
    let http = client();
    let health = http.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status(), 503);
    assert_eq!(health.json::<Value>().await.unwrap()["status"], "loading");
    let ready = http.get(format!("{base}/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(ready.json::<Value>().await.unwrap()["status"], "loading");
    let requests = [
        http.post(format!("{base}/v1/tasks/t/classify"))
            .json(&json!({"inputs": "a"})),
        http.get(format!("{base}/v1/tasks")),
        http.get(format!("{base}/admin/tasks")).bearer_auth(TOKEN),
    ];
    for r in requests {
        let (status, kind, headers) = error_of(r.send().await.unwrap()).await;
        assert_eq!((status, kind.as_str()), (503, "not_ready"));
        assert!(headers.contains_key("retry-after"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_and_graceful_drain() {
    let store = store_with(&["pt_text_3"]);
    let s = Arc::new(start(&flags(store.path())).await);
    let health: Value = s.get("/health").await.json().await.unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["model"], "tiny-bert");
    s.until("warm", |srv| srv.batcher().is_warm()).await;
    let ready = s.get("/ready").await;
    assert_eq!(ready.status(), 200);

    // Requests in flight when the drain starts...
    let pause = s.server.batcher().pause();
    let inputs = sample_inputs();
    let held = {
        let s = s.clone();
        let body = json!({"inputs": inputs.iter().map(In::json).collect::<Vec<_>>()});
        tokio::spawn(async move { s.classify("pt_text_3", &body).await })
    };
    s.until("rows queued", |srv| srv.batcher().waiting() == inputs.len())
        .await;
    s.server.shutdown();
    // ...while /ready and new requests get 503 at once.
    let ready = s.get("/ready").await;
    assert_eq!(ready.status(), 503);
    assert_eq!(ready.json::<Value>().await.unwrap()["status"], "draining");
    let (status, kind, _) =
        error_of(s.classify("pt_text_3", &json!({"inputs": "new"})).await).await;
    assert_eq!((status, kind.as_str()), (503, "shutting_down"));
    assert_eq!(
        s.get("/health").await.status(),
        200,
        "still alive while draining"
    );
    drop(pause);
    // ...finish with correct scores.
    let resp = held.await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let reference = Reference::new();
    let task = fixture_task("pt_text_3");
    for (i, input) in inputs.iter().enumerate() {
        reference.check(&task, input, &body[i], true);
    }
    let s = Arc::try_unwrap(s).ok().expect("clients done");
    s.server.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_cover_requests_queue_and_batches_with_bounded_task_labels() {
    let store = store_with(&["pt_random_2", "prefix_2", "pt_text_3"]);
    let mut f = flags(store.path());
    f.extend(["--metrics-max-tasks", "1"].map(String::from));
    let s = start(&f).await;
    for t in ["pt_random_2", "prefix_2", "pt_text_3"] {
        assert_eq!(
            s.classify(t, &json!({"inputs": ["a", "b"]})).await.status(),
            200
        );
    }
    assert_eq!(
        s.classify("no-such-task", &json!({"inputs": "a"}))
            .await
            .status(),
        404
    );
    let resp = s.get("/metrics").await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = resp.text().await.unwrap();
    for needle in [
        "softprompt_http_requests_total{route=\"/v1/tasks/{task}/classify\",method=\"POST\",status=\"200\"}",
        "softprompt_http_request_duration_seconds_bucket{",
        "softprompt_queue_seconds_bucket",
        "softprompt_batch_rows_bucket",
        "softprompt_batch_tokens_bucket",
        "softprompt_batch_seconds_bucket",
        "softprompt_classify_requests_total{outcome=\"ok\"}",
        "softprompt_classify_requests_total{outcome=\"not_found\"}",
        "task=\"pt_random_2\"",
        "task=\"other\"",
        "task=\"unknown\"",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    // The raw path of an unknown task never becomes a label.
    assert!(!text.contains("no-such-task"));
}

// ---------------------------------------------------------------- OpenAPI

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_matches_the_router_and_real_answers() {
    let store = store_with(&["pt_text_3"]);
    let s = start(&flags(store.path())).await;
    let doc: Value = s.get("/openapi.json").await.json().await.unwrap();

    // Same (method, path) set in the document and the route table.
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|k| {
                    ["get", "put", "post", "delete", "patch", "head", "options"]
                        .contains(&k.as_str())
                })
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let routed: BTreeSet<(String, String)> = softprompt::server::routes::endpoints()
        .into_iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, routed);

    // Every documented operation is served by the router (neither the 404
    // fallback nor 405), and undocumented methods on those paths are 405.
    for (method, path) in &documented {
        let url = s.url(&path.replace("{task}", "pt_text_3"));
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = s.http.request(m, &url).send().await.unwrap();
        let status = resp.status().as_u16();
        assert_ne!(status, 405, "{method} {path}");
        if status == 404 {
            let (_, kind, _) = error_of(resp).await;
            assert_ne!(kind, "no_route", "{method} {path}");
        }
        for other in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            if !documented.contains(&(other.to_string(), path.clone())) {
                let m = reqwest::Method::from_bytes(other.as_bytes()).unwrap();
                let resp = s.http.request(m, &url).send().await.unwrap();
                assert_eq!(
                    resp.status(),
                    405,
                    "{other} {path} is not documented, so must not be served"
                );
            }
        }
    }

    // Real answers validate against their documented schemas.
    let validate = |schema: &str, instance: &Value| {
        let mut root = doc.clone();
        root.as_object_mut().unwrap().insert(
            "$ref".into(),
            json!(format!("#/components/schemas/{schema}")),
        );
        let validator = jsonschema::validator_for(&root).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(instance)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{schema}: {errors:?}\n{instance}");
    };
    let answer: Value = s
        .classify(
            "pt_text_3",
            &json!({"inputs": ["a", {"text": "b", "text_pair": "c"}], "parameters": {"top_k": 2}}),
        )
        .await
        .json()
        .await
        .unwrap();
    validate("ClassifyResponse", &answer);
    let error: Value = s
        .classify("pt_text_3", &json!({"inputs": ""}))
        .await
        .json()
        .await
        .unwrap();
    validate("ErrorResponse", &error);
    let info: Value = s.get("/v1/tasks/pt_text_3").await.json().await.unwrap();
    validate("TaskInfo", &info);
    let details: Value = s
        .http
        .get(s.url("/admin/tasks"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    validate("TaskDetails", &details[0]);
    let up: Value = s
        .put_adapter("new", "prefix_2", None)
        .await
        .json()
        .await
        .unwrap();
    validate("UploadResponse", &up);
    validate(
        "HealthResponse",
        &s.get("/health").await.json().await.unwrap(),
    );
    validate(
        "ReadyResponse",
        &s.get("/ready").await.json().await.unwrap(),
    );
    // The request schema accepts what the server accepts.
    validate("ClassifyRequest", &json!({"inputs": "x"}));
    validate(
        "ClassifyRequest",
        &json!({"inputs": [{"text": "a", "text_pair": "b"}, "c"], "parameters": {"top_k": null, "function_to_apply": "sigmoid", "truncate": true}}),
    );
}
