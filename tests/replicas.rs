//! Three `softprompt serve` processes sharing one S3 prompt store (moto on
//! loopback), behind nginx configured from the shipped deploy/nginx.conf:
//! an upload through the balancer reaches every replica within the sync
//! interval, and so do a replace and a delete; a killed replica comes back
//! with every task; a replica stopped under load costs no failed request;
//! a store outage leaves the replicas serving and reporting it, and they
//! catch up when it ends. Behind deploy/nginx-affinity.conf (routing by task
//! id) with `--prefetch false`, each replica holds only its share of the
//! tasks, and a stopped replica still costs no request.
//!
//! Needs moto_server (scripts/test_deps.sh installs it into .venv-test) and
//! nginx (Debian package); scripts/test.sh sets SOFTPROMPT_TEST_BIN.

mod s3_support;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use s3_support::{AWS_ENV, Moto, Relay, eventually, free_port, http, store, tool};
use serde_json::{Value, json};
use softprompt::store::PromptStore;
use softprompt::task::{Task, native, peft};

const TOKEN: &str = "replicas-admin-token";
const BUCKET: &str = "replicas";
const PREFIX: &str = "tasks";
/// The poll period of the replicas.
const SYNC: Duration = Duration::from_millis(300);
/// Allowance on top of one poll period for a change to show on every
/// replica: a download, a validation, a busy 2-core machine.
const SLACK: Duration = Duration::from_secs(3);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn task(adapter: &str) -> Task {
    peft::read_dir(&root().join("tests/fixtures/adapters").join(adapter), None).unwrap()
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Waits for a child to exit, killing it after `limit`.
fn reap(child: &mut Child, limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// One `softprompt serve` process on a fixed port (so nginx's upstream
/// list stays valid across restarts).
struct Replica {
    name: String,
    port: u16,
    store_endpoint: String,
    /// Variables on top of the test's defaults.
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Replica {
    fn new(name: &str, store_endpoint: &str) -> Replica {
        Self::with_env(name, store_endpoint, &[])
    }

    fn with_env(name: &str, store_endpoint: &str, env: &[(&str, &str)]) -> Replica {
        let mut r = Replica {
            name: name.into(),
            port: free_port(),
            store_endpoint: store_endpoint.into(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
        };
        r.spawn();
        r
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_softprompt"));
        cmd.arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Only what this test sets applies.
        for (k, _) in std::env::vars() {
            if k.starts_with("SOFTPROMPT_") || k.starts_with("AWS_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(AWS_ENV.iter().copied())
            .env("AWS_ENDPOINT_URL", &self.store_endpoint)
            // The store is on loopback: never through a proxy of the host.
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("no_proxy", "127.0.0.1,localhost")
            .env("SOFTPROMPT_MODEL", root().join("tests/fixtures/tiny-bert"))
            .env("SOFTPROMPT_PROMPTS", format!("s3://{BUCKET}/{PREFIX}"))
            .env("SOFTPROMPT_ADDR", format!("127.0.0.1:{}", self.port))
            .env("SOFTPROMPT_ADMIN_TOKEN", TOKEN)
            .env("SOFTPROMPT_SYNC_INTERVAL_MS", SYNC.as_millis().to_string())
            .env("SOFTPROMPT_BATCH_WAIT_MS", "1")
            .env("SOFTPROMPT_SHUTDOWN_TIMEOUT_MS", "5000")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut child = cmd.spawn().expect("spawn softprompt serve");
        let stderr = child.stderr.take().unwrap();
        let name = self.name.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{name}] {line}");
            }
        });
        self.child = Some(child);
    }

    /// Waits for `/ready` to say 200 and returns its body; panics if the
    /// process exits first.
    async fn ready(&mut self) -> Value {
        let http = http();
        let url = format!("{}/ready", self.base());
        let start = Instant::now();
        loop {
            if let Ok(r) = http.get(&url).send().await
                && r.status() == 200
            {
                return r.json().await.unwrap();
            }
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait().unwrap()
            {
                panic!("{} exited before it was ready: {status}", self.name);
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "{} never became ready",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn stop(&mut self) -> Option<Child> {
        let c = self.child.take()?;
        sigterm(&c);
        Some(c)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// nginx with the shipped deploy/nginx.conf, its upstream block replaced
/// by the replicas' loopback addresses and its listen port by a free one;
/// a foreground child whose files all live in a temp dir.
struct Nginx {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Nginx {
    async fn start(upstreams: &[u16]) -> Nginx {
        Self::start_with("deploy/nginx.conf", upstreams).await
    }

    /// nginx with the shipped config `conf` (relative to the repository).
    async fn start_with(conf_file: &str, upstreams: &[u16]) -> Nginx {
        let bin = tool(
            "nginx",
            &["/usr/sbin"],
            "install the Debian package nginx (or nginx-light)",
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, nginx_conf(conf_file, dir.path(), port, upstreams)).unwrap();
        let mut globals = format!(
            "daemon off; pid {0}/nginx.pid; error_log {0}/error.log warn;",
            dir.path().display()
        );
        // As root the workers would run as nobody, who cannot write to the
        // temp dir that buffers upload bodies.
        if std::fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false)
        {
            globals.push_str(" user root;");
        }
        let child = Command::new(&bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .args(["-g", &globals])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let mut nginx = Nginx { child, port, dir };
        let url = format!("{}/nginx-health", nginx.base());
        let client = http();
        let start = Instant::now();
        loop {
            if let Some(status) = nginx.child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = nginx.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                panic!("nginx exited ({status}): {err}\n{}", nginx.error_log());
            }
            if client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "nginx never answered: {}",
                nginx.error_log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        nginx
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // TERM to the master stops the workers too (KILL would orphan them).
        sigterm(&self.child);
        reap(&mut self.child, Duration::from_secs(10));
    }
}

/// A shipped nginx config (`deploy/nginx.conf`, `deploy/nginx-affinity.conf`)
/// made runnable here: loopback upstreams (keeping the shipped server
/// parameters), a free listen port, the access log and the temp paths in
/// `dir`.
fn nginx_conf(conf_file: &str, dir: &Path, port: u16, upstreams: &[u16]) -> String {
    let path = root().join(conf_file);
    let shipped = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: the multi-replica tests run the shipped nginx configs",
            path.display()
        )
    });
    let (begin, end) = ("# upstream-servers:begin", "# upstream-servers:end");
    let (Some(b), Some(e)) = (shipped.find(begin), shipped.find(end)) else {
        panic!("{conf_file} lacks the marker lines {begin:?} and {end:?}");
    };
    let block = &shipped[b + begin.len()..e];
    let params: Vec<&str> = block
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("server "))
        .expect("a server line between the markers")
        .trim_end_matches(';')
        .split_whitespace()
        .skip(2)
        .collect();
    let servers: String = upstreams
        .iter()
        .map(|p| format!("\n        server 127.0.0.1:{p} {};", params.join(" ")))
        .collect();
    let conf = format!(
        "{}{begin}{servers}\n        {}",
        &shipped[..b],
        &shipped[e..]
    );
    let listens = conf.lines().filter(|l| l.trim() == "listen 8080;").count();
    assert_eq!(listens, 1, "{conf_file}: one `listen 8080;` line");
    let d = dir.display();
    let mut out = String::new();
    for line in conf.lines() {
        let t = line.trim_start();
        if t.trim_end() == "listen 8080;" {
            out.push_str(&format!("        listen 127.0.0.1:{port};\n"));
            continue;
        }
        if let Some(rest) = t.strip_prefix("access_log ") {
            // Same format, a file here.
            let format = rest
                .trim_end_matches(';')
                .split_whitespace()
                .nth(1)
                .unwrap_or("");
            out.push_str(&format!("    access_log {d}/access.log {format};\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if t.starts_with("http {") {
            for (directive, sub) in [
                ("client_body_temp_path", "client_body"),
                ("proxy_temp_path", "proxy"),
                ("fastcgi_temp_path", "fastcgi"),
                ("uwsgi_temp_path", "uwsgi"),
                ("scgi_temp_path", "scgi"),
            ] {
                out.push_str(&format!("    {directive} {d}/{sub};\n"));
            }
        }
    }
    out
}

async fn served_version(http: &reqwest::Client, base: &str, id: &str) -> Option<String> {
    let r = http
        .get(format!("{base}/v1/tasks/{id}"))
        .send()
        .await
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    let v: Value = r.json().await.ok()?;
    v["version"].as_str().map(String::from)
}

async fn classify(http: &reqwest::Client, base: &str, id: &str) -> reqwest::Response {
    http.post(format!("{base}/v1/tasks/{id}/classify"))
        .json(&json!({"inputs": "the replicas agree"}))
        .send()
        .await
        .unwrap()
}

async fn put(http: &reqwest::Client, base: &str, id: &str, t: &Task) -> reqwest::Response {
    http.put(format!("{base}/admin/tasks/{id}"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/octet-stream")
        .body(native::to_bytes(t).unwrap())
        .send()
        .await
        .unwrap()
}

/// Waits until every replica serves `id` at `version` (`None`: not at
/// all); returns the slowest replica's time.
async fn on_every_replica(
    http: &reqwest::Client,
    replicas: &[Replica],
    id: &str,
    version: Option<&str>,
) -> Duration {
    let mut slowest = Duration::ZERO;
    let start = Instant::now();
    for r in replicas {
        let base = r.base();
        let what = format!("{} serves {id} at {version:?}", r.name);
        eventually(&what, SYNC + SLACK * 2, || {
            let (http, base) = (http.clone(), base.clone());
            async move { served_version(&http, &base, id).await.as_deref() == version }
        })
        .await;
        slowest = slowest.max(start.elapsed());
    }
    slowest
}

/// Clients classifying through the balancer in a loop, counting answers.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(http: &reqwest::Client, lb: &str, task: &str) -> Load {
        Self::over(http, lb, &[task])
    }

    /// Clients cycling through `tasks`, each from its own starting point.
    fn over(http: &reqwest::Client, lb: &str, tasks: &[&str]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let urls: Arc<Vec<String>> = Arc::new(
            tasks
                .iter()
                .map(|t| format!("{lb}/v1/tasks/{t}/classify"))
                .collect(),
        );
        let clients = (0..4)
            .map(|c| {
                let (http, stop, ok, failed, urls) = (
                    http.clone(),
                    stop.clone(),
                    ok.clone(),
                    failed.clone(),
                    urls.clone(),
                );
                tokio::spawn(async move {
                    let mut i = c * 7;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let url = &urls[i % urls.len()];
                        let resp = http
                            .post(url)
                            .json(&json!({"inputs": ["under load", "still answered"]}))
                            .send()
                            .await;
                        match resp {
                            Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                            Ok(r) => {
                                eprintln!(
                                    "[test] failed under load: {} {}",
                                    r.status(),
                                    r.text().await.unwrap_or_default()
                                );
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                            Err(e) => {
                                eprintln!("[test] failed under load: {e}");
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            clients,
        }
    }

    fn answered(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` requests were answered.
    async fn reaches(&self, n: usize) {
        let ok = self.ok.clone();
        eventually(
            &format!("{n} requests answered under load"),
            Duration::from_secs(30),
            move || {
                let ok = ok.clone();
                async move { ok.load(Ordering::Relaxed) >= n }
            },
        )
        .await;
    }

    /// Stops the clients and checks that none of their requests failed
    /// (`what` names the event they ran through, for the message).
    async fn finish_without_failures(self, what: &str, nginx: &Nginx) {
        let (ok_n, failed_n) = self.finish().await;
        eprintln!("[test] {what}: {ok_n} answered, {failed_n} failed");
        assert_eq!(
            failed_n,
            0,
            "requests failed: {what}\n{}",
            nginx.access_log()
        );
    }

    /// Stops the clients; returns (answered, failed).
    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for c in self.clients {
            c.await.unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// The two many-process tests take turns: each runs three replicas, nginx
/// and moto with timing bounds sized for a 2-core machine to itself.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_behind_nginx_share_one_store() {
    let _turn = HEAVY.lock().await;
    let started = Instant::now();
    let moto = Moto::start().await;
    moto.create_bucket(BUCKET).await;
    // The replicas reach the store through a relay that the outage step cuts.
    let mut relay = Relay::start(moto.port).await;
    let mut replicas: Vec<Replica> = (1..=3)
        .map(|i| Replica::new(&format!("replica-{i}"), &relay.endpoint()))
        .collect();
    for r in &mut replicas {
        let ready = r.ready().await;
        assert_eq!(
            ready["store"]["location"],
            format!("s3://{BUCKET}/{PREFIX}"),
            "{ready}"
        );
        assert_eq!(ready["store"]["reachable"], true, "{ready}");
    }
    let nginx = Nginx::start(&replicas.iter().map(|r| r.port).collect::<Vec<_>>()).await;
    let lb = nginx.base();
    let http = http();
    eprintln!(
        "[test] moto, 3 replicas and nginx up in {:?}",
        started.elapsed()
    );

    // ---- An upload through the balancer reaches every replica.
    let (a, b) = (task("pt_random_2"), task("prefix_2"));
    let resp = put(&http, &lb, "shared", &a).await;
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    let took = on_every_replica(&http, &replicas, "shared", Some(&a.version)).await;
    eprintln!("[test] upload on every replica after {took:?}");
    assert!(
        took <= SYNC + SLACK,
        "upload took {took:?} to reach every replica"
    );

    // ---- A replace: every replica answers with the new version.
    let resp = put(&http, &lb, "shared", &b).await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let took = on_every_replica(&http, &replicas, "shared", Some(&b.version)).await;
    eprintln!("[test] replace on every replica after {took:?}");
    assert!(took <= SYNC + SLACK, "replace took {took:?}");
    for r in &replicas {
        let resp = classify(&http, &r.base(), "shared").await;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["x-task-version"].to_str().unwrap(),
            b.version,
            "{}",
            r.name
        );
    }

    // ---- A delete: every replica answers 404.
    let resp = http
        .delete(format!("{lb}/admin/tasks/shared"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let took = on_every_replica(&http, &replicas, "shared", None).await;
    eprintln!("[test] delete on every replica after {took:?}");
    assert!(took <= SYNC + SLACK, "delete took {took:?}");
    for r in &replicas {
        assert_eq!(
            classify(&http, &r.base(), "shared").await.status(),
            404,
            "{}",
            r.name
        );
    }

    // ---- A killed replica misses an upload and a delete, and comes back
    // with the store's tasks as soon as it says ready.
    for (id, t) in [("kept", &a), ("doomed", &b)] {
        assert_eq!(put(&http, &lb, id, t).await.status(), 201);
    }
    on_every_replica(&http, &replicas, "doomed", Some(&b.version)).await;
    replicas[0].kill();
    let resp = put(&http, &lb, "while-down", &b).await;
    assert_eq!(
        resp.status(),
        201,
        "nginx routes around the dead replica: {}",
        resp.text().await.unwrap()
    );
    let resp = http
        .delete(format!("{lb}/admin/tasks/doomed"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    replicas[0].spawn();
    replicas[0].ready().await;
    let base = replicas[0].base();
    assert_eq!(
        served_version(&http, &base, "kept").await.as_deref(),
        Some(a.version.as_str())
    );
    assert_eq!(
        served_version(&http, &base, "while-down").await.as_deref(),
        Some(b.version.as_str())
    );
    assert_eq!(
        served_version(&http, &base, "doomed").await,
        None,
        "deleted while it was down"
    );
    on_every_replica(&http, &replicas, "doomed", None).await;

    // ---- One replica stopped under load, gracefully (SIGTERM: it drains,
    // answering 503 to new requests, then exits) and abruptly (SIGKILL:
    // connections reset mid-request): no request through the balancer
    // fails, since nginx resends a classify to another replica.
    let load = Load::start(&http, &lb, "kept");
    load.reaches(20).await;
    let mut stopped = replicas[1].stop().expect("running");
    let stopped = tokio::task::spawn_blocking(move || {
        reap(&mut stopped, Duration::from_secs(30));
        stopped.try_wait().unwrap()
    })
    .await
    .unwrap();
    assert!(
        stopped.is_some_and(|s| s.success()),
        "the stopped replica exits 0 after draining: {stopped:?}"
    );
    load.reaches(load.answered() + 20).await;
    load.finish_without_failures("SIGTERM under load", &nginx)
        .await;
    replicas[1].spawn();
    replicas[1].ready().await;

    let load = Load::start(&http, &lb, "kept");
    load.reaches(20).await;
    replicas[2].kill();
    load.reaches(load.answered() + 20).await;
    load.finish_without_failures("SIGKILL under load", &nginx)
        .await;
    replicas[2].spawn();
    replicas[2].ready().await;

    // ---- Store outage: replicas keep serving and say so; an upload is
    // refused (the store is written first); they catch up afterwards.
    relay.cut();
    for r in &replicas {
        let base = r.base();
        let start = Instant::now();
        let last = loop {
            let resp = http.get(format!("{base}/ready")).send().await.unwrap();
            let code = resp.status();
            let body: Value = resp.json().await.unwrap();
            if body["store"]["reachable"] == false {
                assert_eq!(code, 200, "stale tasks beat no tasks: still ready {body}");
                break body;
            }
            assert!(
                start.elapsed() < SYNC + SLACK * 2,
                "{} never reported the outage: {body}",
                r.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        eprintln!(
            "[test] {} reports the outage after {:?}",
            r.name,
            start.elapsed()
        );
        assert_eq!(
            last["ready"], true,
            "stale tasks beat no tasks: still ready {last}"
        );
        assert!(
            last["store"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("s3://replicas/tasks")),
            "{last}"
        );
        let metrics = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            metrics.contains("softprompt_store_reachable 0"),
            "{}",
            r.name
        );
        assert!(
            metrics.contains("softprompt_store_sync_failures_total"),
            "{}",
            r.name
        );
        assert_eq!(
            classify(&http, &base, "kept").await.status(),
            200,
            "{} serves during the outage",
            r.name
        );
    }
    assert_eq!(classify(&http, &lb, "kept").await.status(), 200);
    // Through nginx: refused (503 from every replica it tries, or 502 once
    // it has marked them all failed); from a replica: why.
    let resp = put(&http, &lb, "refused", &a).await;
    assert!(
        [502, 503].contains(&resp.status().as_u16()),
        "an upload needs the store: {}",
        resp.status()
    );
    let resp = put(&http, &replicas[2].base(), "refused", &a).await;
    assert_eq!(resp.status(), 503, "an upload needs the store");
    assert!(resp.headers().contains_key("retry-after"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error_type"], "store_unavailable", "{body}");
    for r in &replicas {
        assert_eq!(
            served_version(&http, &r.base(), "refused").await,
            None,
            "not published without the store"
        );
    }
    // Changed in the store meanwhile (by whoever can still reach it).
    let direct = store(&moto.endpoint(), BUCKET, PREFIX);
    direct.put("during-outage", &b).await.unwrap();
    direct.delete("kept").await.unwrap();
    relay.resume().await;
    let took = on_every_replica(&http, &replicas, "during-outage", Some(&b.version)).await;
    on_every_replica(&http, &replicas, "kept", None).await;
    eprintln!("[test] caught up after the outage in {took:?}");
    for r in &replicas {
        let ready: Value = http
            .get(format!("{}/ready", r.base()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(ready["store"]["reachable"], true, "{ready}");
        assert!(ready["store"]["error"].is_null(), "{ready}");
    }

    let stops: Vec<Child> = replicas.iter_mut().filter_map(Replica::stop).collect();
    for mut c in stops {
        reap(&mut c, Duration::from_secs(20));
    }
    drop(nginx);
    eprintln!("[test] whole scenario in {:?}", started.elapsed());
}

/// A replica whose store cannot be read at start-up does not exit: it
/// answers `/ready` 503 `waiting_for_store` with the reason, and becomes
/// ready with every stored task once the store can be read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_waits_for_an_unreachable_store_at_start() {
    let moto = Moto::start().await;
    moto.create_bucket(BUCKET).await;
    let t = task("ptune_mlp_2");
    store(&moto.endpoint(), BUCKET, PREFIX)
        .put("stored", &t)
        .await
        .unwrap();
    let mut relay = Relay::start(moto.port).await;
    relay.cut();
    let mut replica = Replica::new("waiting", &relay.endpoint());
    let http = http();
    let url = format!("{}/ready", replica.base());
    let start = Instant::now();
    let body = loop {
        if let Ok(r) = http.get(&url).send().await {
            let code = r.status();
            let body: Value = r.json().await.unwrap();
            if body["status"] == "waiting_for_store" {
                assert_eq!(code, 503, "{body}");
                break body;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "never reported waiting for the store"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(body["ready"], false);
    assert_eq!(body["store"]["reachable"], false, "{body}");
    let error = body["store"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("s3://replicas/tasks") && error.contains("list"),
        "{body}"
    );
    // Requests are refused with the reason while it waits.
    let resp = http
        .get(format!("{}/v1/tasks", replica.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let refusal: Value = resp.json().await.unwrap();
    assert!(
        refusal["error"].as_str().unwrap().contains("prompt store"),
        "{refusal}"
    );
    // Still retrying a while later, not exited.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        replica
            .child
            .as_mut()
            .unwrap()
            .try_wait()
            .unwrap()
            .is_none(),
        "the replica exited"
    );

    relay.resume().await;
    let ready = replica.ready().await;
    eprintln!(
        "[test] ready {:?} after the store came back",
        start.elapsed()
    );
    assert_eq!(ready["store"]["reachable"], true, "{ready}");
    assert_eq!(
        served_version(&http, &replica.base(), "stored")
            .await
            .as_deref(),
        Some(t.version.as_str())
    );
    if let Some(mut c) = replica.stop() {
        reap(&mut c, Duration::from_secs(20));
    }
}

/// Task-affinity routing (deploy/nginx-affinity.conf) over replicas that
/// load tasks only on request: each requested task is resident on exactly
/// one replica, each replica holds about a third of them, and a replica
/// stopped under load costs no request (its tasks move to the next replica
/// on the ring and load there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_routing_keeps_each_task_on_one_replica_and_survives_a_stopped_one() {
    let _turn = HEAVY.lock().await;
    let moto = Moto::start().await;
    moto.create_bucket(BUCKET).await;
    let s3 = store(&moto.endpoint(), BUCKET, PREFIX);
    let t = task("pt_text_3");
    let ids: Vec<String> = (0..60).map(|i| format!("tenant-{i:02}")).collect();
    for id in &ids {
        s3.put(id, &t).await.unwrap();
    }
    let env = [
        ("SOFTPROMPT_PREFETCH", "false"),
        ("SOFTPROMPT_TASK_MEMORY", "64M"),
    ];
    let mut replicas: Vec<Replica> = (1..=3)
        .map(|i| Replica::with_env(&format!("affinity-{i}"), &moto.endpoint(), &env))
        .collect();
    for r in &mut replicas {
        r.ready().await;
    }
    let nginx = Nginx::start_with(
        "deploy/nginx-affinity.conf",
        &replicas.iter().map(|r| r.port).collect::<Vec<_>>(),
    )
    .await;
    let (lb, http) = (nginx.base(), http());
    let resident = |base: String| {
        let http = http.clone();
        async move {
            let list: Value = http
                .get(format!("{base}/v1/tasks"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            list.as_array()
                .unwrap()
                .iter()
                .filter(|e| e["resident"] == json!(true))
                .map(|e| e["id"].as_str().unwrap().to_string())
                .collect::<Vec<String>>()
        }
    };
    for r in &replicas {
        assert!(resident(r.base()).await.is_empty(), "nothing loaded ahead");
    }

    for _ in 0..2 {
        for id in &ids {
            let resp = classify(&http, &lb, id).await;
            assert_eq!(resp.status(), 200, "{id}");
        }
    }
    let mut holders = std::collections::HashMap::<String, usize>::new();
    let mut shares = Vec::new();
    for r in &replicas {
        let held = resident(r.base()).await;
        shares.push(held.len());
        for id in held {
            *holders.entry(id).or_default() += 1;
        }
    }
    eprintln!("[test] resident tasks per replica: {shares:?}");
    assert_eq!(
        holders.len(),
        ids.len(),
        "every requested task is resident somewhere"
    );
    assert!(
        holders.values().all(|&n| n == 1),
        "each task on one replica only: {holders:?}"
    );
    // 60 keys on a ring where each replica owns about a third: 20 ± 4
    // each; the bound is over 3 standard deviations wide.
    assert!(
        shares.iter().all(|&n| (8..=34).contains(&n)),
        "about a third each: {shares:?}"
    );

    // A replica stopped under load: its tasks move to the others.
    let names: Vec<&str> = ids.iter().map(String::as_str).collect();
    let load = Load::over(&http, &lb, &names);
    load.reaches(30).await;
    let mut stopped = replicas[0].stop().expect("running");
    tokio::task::spawn_blocking(move || reap(&mut stopped, Duration::from_secs(30)))
        .await
        .unwrap();
    load.reaches(load.answered() + 60).await;
    load.finish_without_failures("affinity, SIGTERM under load", &nginx)
        .await;
    for id in &ids {
        assert_eq!(classify(&http, &lb, id).await.status(), 200, "{id}");
    }
    let rest: usize = {
        let mut n = 0;
        for r in &replicas[1..] {
            n += resident(r.base()).await.len();
        }
        n
    };
    assert_eq!(rest, ids.len(), "the two left hold every task once");
}
