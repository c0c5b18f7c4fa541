//! Helpers for the shared-store tests: a moto S3 server on loopback, a
//! TCP relay in front of it that the tests cut to simulate an outage, and
//! locating outside programs.
//!
//! Outside programs come from `$SOFTPROMPT_TEST_BIN` (scripts/test.sh sets
//! it to the venv that scripts/test_deps.sh fills) or `PATH`; when one is
//! missing the test fails and says how to install it.
// Each test binary that includes this module uses only part of it (no item
// is unused by all of them).
#![allow(dead_code)]

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::aws::AmazonS3Builder;
use softprompt::store::ObjectPromptStore;

/// Credentials and region moto accepts (it checks none of them).
pub const AWS_ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "test"),
    ("AWS_SECRET_ACCESS_KEY", "test"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_ALLOW_HTTP", "true"),
];

/// An outside program from `$SOFTPROMPT_TEST_BIN`, `PATH`, or `extra`
/// directories; panics with how to install it when it is nowhere.
pub fn tool(name: &str, extra: &[&str], install: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("SOFTPROMPT_TEST_BIN") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv-test/bin"));
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.extend(extra.iter().map(PathBuf::from));
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} not found in $SOFTPROMPT_TEST_BIN, .venv-test/bin, PATH or {extra:?}: {install} \
         (scripts/test.sh does this via scripts/test_deps.sh and sets SOFTPROMPT_TEST_BIN)"
    );
}

/// A loopback port nobody listens on right now, and one this test process
/// has not handed out before: the kernel may give the same ephemeral port
/// to two binds in a row once the first listener is closed, and two
/// replicas then race for it ("Address already in use", seen in CI).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = StdListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Polls `cond` every 50 ms until it holds or `limit` passes; returns how
/// long it took, or panics naming `what`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return start.elapsed();
        }
        if start.elapsed() > limit {
            panic!("gave up after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `moto_server` on a loopback port; killed on drop.
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    /// Starts moto and waits until it answers.
    pub async fn start() -> Moto {
        let bin = tool(
            "moto_server",
            &[],
            "install it with `python3 -m venv .venv-test && .venv-test/bin/pip install 'moto[server,s3]'`",
        );
        let port = free_port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let moto = Moto { child, port };
        let http = http();
        let url = moto.endpoint();
        eventually("moto_server answers", Duration::from_secs(60), || {
            let req = http.get(&url).send();
            async move { req.await.is_ok_and(|r| r.status().is_success()) }
        })
        .await;
        moto
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket (moto takes a plain PUT).
    pub async fn create_bucket(&self, bucket: &str) {
        let resp = http()
            .put(format!("{}/{bucket}", self.endpoint()))
            .send()
            .await
            .unwrap();
        assert!(
            resp.status().is_success(),
            "create bucket {bucket}: {}",
            resp.status()
        );
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An S3 client of `endpoint` (path-style, plain HTTP, test credentials).
pub fn s3_builder(endpoint: &str) -> AmazonS3Builder {
    AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .with_region("us-east-1")
}

/// The prompt store at `s3://bucket/prefix` of `endpoint`.
pub fn store(endpoint: &str, bucket: &str, prefix: &str) -> ObjectPromptStore {
    ObjectPromptStore::s3(s3_builder(endpoint), bucket, prefix).expect("S3 store configures")
}

/// The raw object store of `bucket`, to put objects the prompt store would
/// never write (adapter directories, corrupt files).
pub fn raw(endpoint: &str, bucket: &str) -> Arc<dyn object_store::ObjectStore> {
    Arc::new(
        s3_builder(endpoint)
            .with_bucket_name(bucket)
            .build()
            .unwrap(),
    )
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A TCP relay from a fixed loopback port to `target`: the replicas talk
/// to the store through it, and cutting it (listener closed, open
/// connections dropped) is an outage of the store from their side while
/// the store keeps its data.
pub struct Relay {
    pub port: u16,
    target: u16,
    tasks: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    /// Relays a free port to `target`.
    pub async fn start(target: u16) -> Relay {
        let mut relay = Relay {
            port: free_port(),
            target,
            tasks: None,
        };
        relay.resume().await;
        relay
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Closes the port and drops every relayed connection.
    pub fn cut(&mut self) {
        if let Some(t) = self.tasks.take() {
            t.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn resume(&mut self) {
        self.cut();
        let listener = {
            let mut tries = 0;
            loop {
                match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                    Ok(l) => break l,
                    Err(e) if tries < 50 => {
                        tries += 1;
                        let _ = e;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("relay cannot listen on {} again: {e}", self.port),
                }
            }
        };
        let target = self.target;
        self.tasks = Some(tokio::spawn(async move {
            // Connections live in this set: aborting the accept loop drops
            // the set, which aborts them all.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                conns.spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        }));
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
    }
}
