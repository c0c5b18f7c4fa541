//! `softprompt train` with S3: training data read from `s3://bucket/key`,
//! the trained task published with `--output s3://bucket/prefix/ID` to the
//! store a running `softprompt serve` polls, which then serves it with no
//! upload; a bad id, a bad or unreachable store, and bad S3 data fail before
//! training starts.
//!
//! Needs moto_server (scripts/test_deps.sh installs it into .venv-test);
//! scripts/test.sh sets SOFTPROMPT_TEST_BIN.

mod process_support;
mod s3_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use object_store::ObjectStoreExt;
use process_support::{spawn_tagged, wait_ready};
use s3_support::{AWS_ENV, Moto, eventually, free_port, http, raw, store};
use serde_json::{Value, json};
use softprompt::store::PromptStore;

const BUCKET: &str = "fleet";
const PREFIX: &str = "prod/tasks";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny_bert() -> PathBuf {
    root().join("tests/fixtures/tiny-bert")
}

/// A command of the binary with only the `AWS_*` settings of this test
/// (none of the host's `SOFTPROMPT_*`/`AWS_*`), talking to `endpoint`.
fn softprompt(endpoint: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_softprompt"));
    for (k, _) in std::env::vars() {
        if k.starts_with("SOFTPROMPT_") || k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(AWS_ENV.iter().copied())
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost");
    cmd
}

/// Three separable classes, as tests/train.rs's CLI test trains them.
fn jsonl(n: usize) -> String {
    let words = ["this", "to", "do"];
    (0..n)
        .map(|i| {
            let l = i % 3;
            format!(
                "{{\"text\": \"at {} every\", \"label\": \"{}\"}}\n",
                words[l],
                ["x", "y", "z"][l]
            )
        })
        .collect()
}

async fn put_object(endpoint: &str, key: &str, body: &str) {
    raw(endpoint, BUCKET)
        .put(
            &object_store::path::Path::from(key),
            body.as_bytes().to_vec().into(),
        )
        .await
        .unwrap();
}

/// `softprompt train` on tiny-bert with `args`, in `cwd`; the checkpoint
/// (local) lands in `cwd`.
fn train(endpoint: &str, cwd: &Path, args: &[&str]) -> Output {
    softprompt(endpoint)
        .current_dir(cwd)
        .args(["train", "--model", tiny_bert().to_str().unwrap()])
        .args(["--virtual-tokens", "3", "--batch-size", "6", "--lr", "0.05"])
        .arg("--quiet")
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `softprompt serve` on `s3://BUCKET/PREFIX`, polled every 200 ms.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    async fn start(endpoint: &str) -> Server {
        let mut cmd = softprompt(endpoint);
        cmd.arg("serve")
            .env("SOFTPROMPT_MODEL", tiny_bert())
            .env("SOFTPROMPT_PROMPTS", format!("s3://{BUCKET}/{PREFIX}"))
            .env("SOFTPROMPT_ADDR", "127.0.0.1:0")
            .env("SOFTPROMPT_SYNC_INTERVAL_MS", "200")
            .env("SOFTPROMPT_BATCH_WAIT_MS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let (child, base, _logs) = spawn_tagged(cmd, "serve");
        wait_ready(&http(), &base).await;
        Server { child, base }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trained_task_reaches_a_running_server_through_the_store() {
    let moto = Moto::start().await;
    let endpoint = moto.endpoint();
    moto.create_bucket(BUCKET).await;
    put_object(&endpoint, "data/train.jsonl", &jsonl(60)).await;
    put_object(
        &endpoint,
        "data/val.csv",
        "text,label\nat this every,x\nat to every,y\nat do every,z\n",
    )
    .await;
    let server = Server::start(&endpoint).await;
    let client = http();
    let task_url = format!("{}/v1/tasks/newtask", server.base);
    assert_eq!(client.get(&task_url).send().await.unwrap().status(), 404);

    let work = tempfile::tempdir().unwrap();
    let out = tokio::task::spawn_blocking({
        let (endpoint, cwd) = (endpoint.clone(), work.path().to_path_buf());
        move || {
            train(
                &endpoint,
                &cwd,
                &[
                    "--train",
                    &format!("s3://{BUCKET}/data/train.jsonl"),
                    "--val",
                    &format!("s3://{BUCKET}/data/val.csv"),
                    "--test",
                    &format!("s3://{BUCKET}/data/train.jsonl"),
                    "--output",
                    &format!("s3://{BUCKET}/{PREFIX}/newtask"),
                    "--steps",
                    "40",
                ],
            )
        }
    })
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "train: {}", stderr(&out));
    assert!(
        said.contains(&format!(
            "published s3://{BUCKET}/{PREFIX}/newtask.safetensors"
        )),
        "{said}"
    );
    // The checkpoint stayed local, named after the id.
    assert!(work.path().join("newtask.safetensors.ckpt").is_file());

    // In the store as an upload would have left it: one native object.
    let stored = store(&endpoint, BUCKET, PREFIX);
    let listed = stored.list().await.unwrap();
    assert_eq!(
        listed.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["newtask"]
    );
    let task = stored.load("newtask").await.unwrap();
    assert_eq!(task.meta.labels, ["x", "y", "z"]);
    assert_eq!(task.meta.provenance.data.as_deref(), Some("train.jsonl"));
    assert!(
        task.meta.provenance.metrics["test_accuracy"]
            .as_f64()
            .unwrap()
            > 0.9,
        "{}",
        task.meta.provenance.metrics
    );

    // Served by the running server on its next poll, with no upload.
    let took = eventually("the server serves newtask", Duration::from_secs(10), || {
        let req = client.get(&task_url).send();
        async move { req.await.is_ok_and(|r| r.status() == 200) }
    })
    .await;
    eprintln!("served {took:?} after publishing");
    let details: Value = client
        .get(&task_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(details["version"], task.version.as_str(), "{details}");
    let r = client
        .post(format!("{task_url}/classify"))
        .json(&json!({"inputs": ["at do every", "at this every"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    // Each input's labels, best first.
    assert_eq!(body[0][0]["label"], "z", "{body}");
    assert_eq!(body[1][0]["label"], "x", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_id_or_store_fails_before_training() {
    let moto = Moto::start().await;
    let endpoint = moto.endpoint();
    moto.create_bucket(BUCKET).await;
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("d.jsonl");
    std::fs::write(&data, jsonl(30)).unwrap();
    let data = data.to_str().unwrap().to_string();
    let refused = |endpoint: &str, output: &str, env: &[(&str, &str)]| {
        let started = Instant::now();
        let mut cmd = softprompt(endpoint);
        cmd.current_dir(work.path())
            .args(["train", "--model", tiny_bert().to_str().unwrap()])
            .args(["--train", &data, "--output", output, "--steps", "500"])
            .arg("--quiet");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let o = cmd.output().unwrap();
        let err = stderr(&o);
        assert!(!o.status.success(), "{output}: accepted: {err}");
        // Nothing trained: no checkpoint anywhere in the working directory.
        let left: Vec<_> = std::fs::read_dir(work.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != "d.jsonl")
            .collect();
        assert!(left.is_empty(), "{output}: left {left:?}: {err}");
        (err, started.elapsed())
    };
    for (output, says) in [
        ("s3://fleet/prod/bad id", "task id \"bad id\" is invalid"),
        ("s3://fleet/prod/.hidden", "task id \".hidden\" is invalid"),
        ("s3://fleet/prod/", "no task id"),
        ("s3://fleet", "expected s3://bucket/prefix/ID"),
        ("s3://fleet/a//x", "empty, '.' or '..' segment"),
        ("gs://fleet/prod/x", "unsupported store scheme"),
    ] {
        let (err, _) = refused(&endpoint, output, &[]);
        assert!(
            err.contains("--output") && err.contains(says),
            "{output}: {err}"
        );
    }
    // A bucket that does not exist: the LIST up front fails.
    let (err, _) = refused(&endpoint, "s3://no-such-bucket/prod/x", &[]);
    assert!(
        err.contains("cannot read the prompt store s3://no-such-bucket/prod")
            && err.contains("before training"),
        "{err}"
    );
    // A plain-HTTP endpoint without AWS_ALLOW_HTTP=true: refused by the client.
    let (err, _) = refused(
        &endpoint,
        "s3://fleet/prod/x",
        &[("AWS_ALLOW_HTTP", "false")],
    );
    assert!(err.contains("AWS_ALLOW_HTTP=true"), "{err}");
    // Nothing listening at the endpoint: fails within the client's retries.
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let (err, took) = refused(&nobody, "s3://fleet/prod/x", &[]);
    assert!(
        err.contains("cannot read the prompt store s3://fleet/prod"),
        "{err}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
    // The store is still empty.
    assert!(
        store(&endpoint, BUCKET, "prod")
            .list()
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_s3_data_is_refused_naming_the_object_and_line() {
    let moto = Moto::start().await;
    let endpoint = moto.endpoint();
    moto.create_bucket(BUCKET).await;
    put_object(&endpoint, "data/train.jsonl", &jsonl(12)).await;
    put_object(
        &endpoint,
        "data/val.jsonl",
        "{\"text\": \"at this\", \"label\": \"x\"}\n{\"text\": \"at to\", \"label\": \"w\"}\n",
    )
    .await;
    put_object(
        &endpoint,
        "data/one.csv",
        "text,label\nat this,x\nat to,x\n",
    )
    .await;
    put_object(&endpoint, "data/nolabel.csv", "text,class\nat this,x\n").await;
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("t.safetensors");
    let out = out.to_str().unwrap();
    let s3 = |key: &str| format!("s3://{BUCKET}/{key}");
    let cases: [(Vec<String>, &str); 5] = [
        (
            vec!["--train".into(), s3("data/missing.jsonl")],
            "s3://fleet/data/missing.jsonl: no such object",
        ),
        (
            vec!["--train".into(), "s3://fleet".into()],
            "expected s3://bucket/key",
        ),
        (
            vec![
                "--train".into(),
                s3("data/train.jsonl"),
                "--val".into(),
                s3("data/val.jsonl"),
            ],
            "s3://fleet/data/val.jsonl:2: unknown label \"w\"",
        ),
        (
            vec!["--train".into(), s3("data/one.csv")],
            "s3://fleet/data/one.csv: only one class",
        ),
        (
            vec!["--train".into(), s3("data/nolabel.csv")],
            "s3://fleet/data/nolabel.csv:1: header: no \"label\" column",
        ),
    ];
    for (args, says) in cases {
        let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
        all.extend(["--output", out, "--steps", "2"]);
        let o = train(&endpoint, work.path(), &all);
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?}: accepted");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(
            std::fs::read_dir(work.path()).unwrap().next().is_none(),
            "{args:?}: training started"
        );
    }
}
