//! Offline checks of the deployment files (Dockerfile, deploy/):
//!
//! - both Dockerfiles lint clean with hadolint;
//! - deploy/k8s/*.yaml and deploy/k8s/jobs/*.yaml validate with
//!   `kubernetes-validate --strict`, the kustomization lists every manifest
//!   of deploy/k8s (the on-demand Jobs in jobs/ are left out), and the
//!   shutdown timings fit;
//! - the training Job and the compose `train` service pass only flags
//!   `softprompt train` has and publish to the store the replicas serve;
//! - deploy/nginx.conf passes `nginx -t` once its marked upstream block is
//!   pointed at loopback, and a running nginx retries a classify POST on a
//!   503 but never an admin POST;
//! - deploy/compose.yaml parses (PyYAML) and agrees with nginx.conf;
//! - deploy/healthcheck.sh tells 200 from 503 from nothing listening.
//!
//! Each outside tool is looked up in $SOFTPROMPT_TEST_BIN (scripts/test.sh
//! sets it to .venv-test/bin), then .venv-test/bin, then PATH (nginx also in
//! /usr/sbin). A missing tool fails the test with the install command; no
//! check is skipped. Each tool is also run once on a broken input, so a tool
//! that accepts everything cannot pass for a clean result.

mod s3_support;

use s3_support::free_port;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Finds an outside tool, or fails with how to install it.
fn tool(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("SOFTPROMPT_TEST_BIN") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(root().join(".venv-test/bin"));
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.push(PathBuf::from("/usr/sbin"));
    for d in &dirs {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} not found (looked in $SOFTPROMPT_TEST_BIN, .venv-test/bin, PATH, /usr/sbin). \
         Install the deployment-test tools with `bash scripts/test_deps.sh` (nginx from Debian, \
         the rest into .venv-test), or run the tests through scripts/test.sh, which does that."
    );
}

fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

// --- Dockerfiles ---------------------------------------------------------

#[test]
fn dockerfiles_lint_clean() {
    let hadolint = tool("hadolint");
    for file in ["Dockerfile", "deploy/Dockerfile.cuda"] {
        let out = run(Command::new(&hadolint)
            .arg("--no-color")
            .arg(root().join(file)));
        let said = text(&out);
        assert!(
            out.status.success() && said.trim().is_empty(),
            "hadolint {file}:\n{said}"
        );
    }

    // The same linter fails a Dockerfile with known faults.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("Dockerfile");
    std::fs::write(
        &bad,
        "FROM debian:latest\nRUN cd /tmp && apt-get install curl\n",
    )
    .unwrap();
    let out = run(Command::new(&hadolint).arg("--no-color").arg(&bad));
    let said = text(&out);
    assert!(
        !out.status.success(),
        "hadolint passed a broken Dockerfile:\n{said}"
    );
    assert!(said.contains("DL3007") && said.contains("DL3003"), "{said}");
}

#[test]
fn dockerfiles_keep_the_runtime_contract() {
    for file in ["Dockerfile", "deploy/Dockerfile.cuda"] {
        let df = read(file);
        let runtime = &df[df
            .rfind("AS runtime")
            .unwrap_or_else(|| panic!("{file}: no runtime stage"))..];
        for needle in [
            "USER 10001:10001",
            "EXPOSE 8080",
            "HEALTHCHECK ",
            "STOPSIGNAL SIGTERM",
            "ENTRYPOINT [\"/usr/local/bin/softprompt\"]",
            "CMD [\"serve\"]",
            "SOFTPROMPT_MODEL=/models/all-MiniLM-L6-v2",
            "SOFTPROMPT_PROMPTS=/prompts",
        ] {
            assert!(
                runtime.contains(needle),
                "{file}: runtime stage lacks `{needle}`"
            );
        }
        assert!(
            df.contains("ARG BAKE_MODEL=0") && df.contains("FROM model-${BAKE_MODEL} AS model"),
            "{file}"
        );
    }
    // Every path the build copies must be in the context (.dockerignore).
    let ignore = read(".dockerignore");
    for kept in [
        "src",
        "benches",
        "prompts",
        "scripts",
        "deploy",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        assert!(
            !ignore
                .lines()
                .any(|l| l.trim().trim_end_matches('/') == kept),
            ".dockerignore drops {kept}, which the Dockerfile copies"
        );
    }
    for dropped in ["target/", ".venv*/", "models/", "data/", ".git"] {
        assert!(
            ignore.lines().any(|l| l.trim() == dropped),
            ".dockerignore should drop {dropped}"
        );
    }
}

// --- Kubernetes ----------------------------------------------------------

fn k8s_manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml")
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= 7,
        "deploy/k8s has too few manifests: {files:?}"
    );
    files
}

/// deploy/k8s/jobs/*.yaml: Jobs run on demand (`kubectl create -f`), not
/// part of the kustomization.
fn k8s_job_manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/k8s/jobs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "deploy/k8s/jobs has no manifest");
    files
}

/// deploy/k8s/affinity/*.yaml: the task-affinity overlay's own manifests.
fn k8s_affinity_manifests() -> Vec<PathBuf> {
    let files = vec![root().join("deploy/k8s/affinity/ingress.yaml")];
    let overlay = read("deploy/k8s/affinity/kustomization.yaml");
    for needed in [
        "- ../",
        "- ingress.yaml",
        "SOFTPROMPT_PREFETCH",
        "SOFTPROMPT_TASK_MEMORY",
    ] {
        assert!(
            overlay.contains(needed),
            "affinity overlay lacks {needed:?}"
        );
    }
    files
}

#[test]
fn k8s_manifests_validate_strictly() {
    let validate = tool("kubernetes-validate");
    let mut files = k8s_manifests();
    files.extend(k8s_job_manifests());
    files.extend(k8s_affinity_manifests());
    // The bundled newest schema, and an older release still in support.
    for version in [None, Some("1.30.0")] {
        let mut cmd = Command::new(&validate);
        cmd.arg("--strict").arg("--quiet");
        if let Some(v) = version {
            cmd.arg("-k").arg(v);
        }
        let out = run(cmd.args(&files));
        let said = text(&out);
        assert!(
            out.status.success() && said.trim().is_empty(),
            "kubernetes-validate --strict ({version:?}):\n{said}"
        );
    }

    // A field the schema does not have is refused under --strict.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    let deployment = read("deploy/k8s/deployment.yaml")
        .replace("  replicas: 3\n", "  replicas: 3\n  replica: 3\n");
    std::fs::write(&bad, deployment).unwrap();
    let out = run(Command::new(&validate)
        .arg("--strict")
        .arg("--quiet")
        .arg(&bad));
    assert!(
        !out.status.success(),
        "kubernetes-validate passed an unknown field:\n{}",
        text(&out)
    );
}

#[test]
fn kustomization_lists_every_manifest() {
    let kustomization = read("deploy/k8s/kustomization.yaml");
    let mut listed: Vec<String> = kustomization
        .lines()
        .skip_while(|l| !l.starts_with("resources:"))
        .skip(1)
        .take_while(|l| l.starts_with("  - "))
        .map(|l| l.trim_start_matches("  - ").trim().to_string())
        .collect();
    listed.sort();
    let files: Vec<String> = k8s_manifests()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        listed, files,
        "kustomization.yaml resources vs deploy/k8s/*.yaml"
    );
}

/// The first number after `key` in `text`.
fn number_after(text: &str, key: &str) -> u64 {
    let at = text
        .find(key)
        .unwrap_or_else(|| panic!("`{key}` not found"));
    let digits: String = text[at + key.len()..]
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after `{key}`"))
}

#[test]
fn k8s_grace_period_covers_prestop_and_drain() {
    let deployment = read("deploy/k8s/deployment.yaml");
    let configmap = read("deploy/k8s/configmap.yaml");
    let grace = number_after(&deployment, "terminationGracePeriodSeconds:");
    let pre_stop = number_after(&deployment, "command: [\"sleep\",");
    let drain_ms = number_after(&configmap, "SOFTPROMPT_SHUTDOWN_TIMEOUT_MS:");
    assert!(
        grace * 1000 > pre_stop * 1000 + drain_ms,
        "terminationGracePeriodSeconds {grace}s must exceed preStop {pre_stop}s + shutdown {drain_ms}ms"
    );
    for probe in [
        "path: /ready",
        "path: /health",
        "startupProbe:",
        "livenessProbe:",
        "readinessProbe:",
    ] {
        assert!(deployment.contains(probe), "deployment.yaml lacks {probe}");
    }
}

/// Every `SOFTPROMPT_*` variable the deployment files set is one the
/// binary reads: clap ignores variables it does not know, so a renamed
/// flag would leave a stale setting silently doing nothing.
#[test]
fn deployment_variables_are_ones_the_server_reads() {
    let help = Command::new(env!("CARGO_BIN_EXE_softprompt"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let files = [
        "Dockerfile",
        "deploy/Dockerfile.cuda",
        "deploy/compose.yaml",
        "deploy/k8s/configmap.yaml",
        "deploy/k8s/deployment.yaml",
        "deploy/README.md",
        "deploy/k8s/affinity/kustomization.yaml",
    ];
    let mut checked = 0;
    for f in files {
        let text = read(f);
        for (at, _) in text.match_indices("SOFTPROMPT_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            // The bare prefix (prose), and the health-check script's own knob.
            if name == "SOFTPROMPT_" || name == "SOFTPROMPT_HEALTH_URL_PATH" {
                continue;
            }
            // Secrets are listed without their value: `[env: NAME]`.
            let listed = help.contains(&format!("[env: {name}="))
                || help.contains(&format!("[env: {name}]"));
            assert!(
                listed,
                "{f} sets {name}, which `softprompt serve` does not read"
            );
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} variables found");
}

/// The training Job and the compose `train` service: every flag they pass
/// is one `softprompt train` has, the data and output are where the
/// replicas' store is, and the compose service stays out of a plain `up`.
#[test]
fn training_job_and_compose_service_publish_to_the_served_store() {
    let python = tool("python");
    let dump = r#"
import json, sys, yaml
job = yaml.safe_load(open(sys.argv[1]))
cm = yaml.safe_load(open(sys.argv[2]))
compose = yaml.safe_load(open(sys.argv[3]))
pod = job["spec"]["template"]["spec"]
c = pod["containers"][0]
s = compose["services"]
print(json.dumps({
    "kind": job["kind"],
    "restart": pod["restartPolicy"],
    "job_args": c["args"],
    "job_env_from": [e["configMapRef"]["name"] for e in c["envFrom"]],
    "job_env": [e["name"] for e in c["env"]],
    "job_mounts": [m["mountPath"] for m in c["volumeMounts"]],
    "read_only_root": c["securityContext"]["readOnlyRootFilesystem"],
    "cm_prompts": cm["data"]["SOFTPROMPT_PROMPTS"],
    "compose_args": s["train"]["command"],
    "compose_profiles": s["train"]["profiles"],
    "compose_env": sorted(s["train"]["environment"]),
    "compose_depends": s["train"]["depends_on"]["s3-init"]["condition"],
    "compose_prompts": s["softprompt-1"]["environment"]["SOFTPROMPT_PROMPTS"],
}))
"#;
    let out = run(Command::new(&python)
        .arg("-c")
        .arg(dump)
        .arg(root().join("deploy/k8s/jobs/train-job.yaml"))
        .arg(root().join("deploy/k8s/configmap.yaml"))
        .arg(root().join("deploy/compose.yaml")));
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let help = Command::new(env!("CARGO_BIN_EXE_softprompt"))
        .args(["train", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let strings = |key: &str| -> Vec<String> {
        v[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key}: {v}"))
            .iter()
            .map(|a| {
                a.as_str()
                    .unwrap()
                    // Compose's default for the task name.
                    .replace("${TRAIN_TASK:-topic}", "topic")
            })
            .collect()
    };
    for (file, args, store) in [
        ("train-job.yaml", strings("job_args"), &v["cm_prompts"]),
        (
            "compose.yaml",
            strings("compose_args"),
            &v["compose_prompts"],
        ),
    ] {
        assert_eq!(args[0], "train", "{file}: {args:?}");
        for flag in args.iter().filter(|a| a.starts_with("--")) {
            // An option line of the help: `  --flag <V>` or `  -f, --flag <V>`.
            let has = help.lines().any(|l| {
                let l = l.trim_start();
                let l = l
                    .split_once(", ")
                    .filter(|(short, _)| short.len() == 2 && short.starts_with('-'))
                    .map_or(l, |(_, long)| long);
                l == flag.as_str() || l.starts_with(&format!("{flag} "))
            });
            assert!(has, "{file}: `softprompt train` has no {flag}");
        }
        let after = |flag: &str| {
            let at = args.iter().position(|a| a == flag);
            at.map(|i| args[i + 1].clone())
                .unwrap_or_else(|| panic!("{file}: no {flag}"))
        };
        let output = after("--output");
        let store = store.as_str().unwrap();
        let id = output
            .strip_prefix(&format!("{store}/"))
            .unwrap_or_else(|| {
                panic!("{file}: --output {output} is not in the served store {store}")
            });
        softprompt::registry::validate_id(id).unwrap();
        // Checkpoints stay on a writable local path.
        let ckpt = after("--checkpoint");
        assert!(
            ckpt.starts_with("/scratch/") || ckpt.starts_with("/tmp/"),
            "{file}: checkpoint {ckpt}"
        );
    }
    assert_eq!(v["kind"], "Job");
    assert_eq!(v["restart"], "OnFailure");
    assert_eq!(v["job_env_from"], serde_json::json!(["softprompt"]));
    for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        assert!(strings("job_env").contains(&k.to_string()), "job lacks {k}");
    }
    assert!(strings("job_mounts").contains(&"/scratch".to_string()));
    assert_eq!(v["read_only_root"], true);
    assert_eq!(v["compose_profiles"], serde_json::json!(["train"]));
    assert_eq!(v["compose_depends"], "service_completed_successfully");
    for k in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL",
        "AWS_ALLOW_HTTP",
    ] {
        assert!(
            strings("compose_env").contains(&k.to_string()),
            "compose train lacks {k}"
        );
    }
    // Not applied with the fleet: the kustomization lists no Job.
    assert!(!read("deploy/k8s/kustomization.yaml").contains("jobs/"));
}

// --- nginx ---------------------------------------------------------------

const BEGIN: &str = "# upstream-servers:begin";
const END: &str = "# upstream-servers:end";

/// deploy/nginx.conf made runnable by an ordinary user under `prefix`: the
/// marked upstream servers replaced by `servers`, the listen port by
/// `listen`, and temp paths under the prefix (what tests/replicas.rs does).
fn loopback_nginx_conf(prefix: &Path, servers: &[String], listen: u16) -> PathBuf {
    let conf = read("deploy/nginx.conf");
    assert_eq!(conf.matches(BEGIN).count(), 1, "one `{BEGIN}` line");
    assert_eq!(conf.matches(END).count(), 1, "one `{END}` line");
    let listens: Vec<&str> = conf
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("listen "))
        .collect();
    assert_eq!(
        listens,
        ["listen 8080;"],
        "the only listen directive is `listen 8080;`"
    );
    for absent in ["pid ", "error_log ", "_temp_path ", "user "] {
        assert!(
            !conf.lines().any(|l| l.trim_start().starts_with(absent)),
            "nginx.conf sets `{absent}`, which a test must be able to set"
        );
    }
    assert_eq!(
        conf.lines().filter(|l| l.trim() == "http {").count(),
        1,
        "one `http {{` line"
    );
    assert_eq!(
        conf.matches("http {").count(),
        1,
        "`http {{` only on the http block's line"
    );

    let begin = conf.find(BEGIN).unwrap() + BEGIN.len();
    let end = conf[..conf.find(END).unwrap()].rfind('\n').unwrap();
    let block: String = servers
        .iter()
        .map(|s| format!("\n        server {s};"))
        .collect();
    let mut out = format!("{}{}{}", &conf[..begin], block, &conf[end..]);
    out = out.replace("listen 8080;", &format!("listen 127.0.0.1:{listen};"));
    let tmp = prefix.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let temps: String = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
        .iter()
        .map(|k| format!("\n    {k}_temp_path {};", tmp.join(k).display()))
        .collect();
    out = out.replacen("http {", &format!("http {{{temps}"), 1);
    out = out.replace(
        "access_log /dev/stdout",
        &format!("access_log {}", prefix.join("access.log").display()),
    );
    let path = prefix.join("nginx.conf");
    std::fs::write(&path, out).unwrap();
    path
}

fn nginx_cmd(prefix: &Path, conf: &Path, extra_global: &str) -> Command {
    let mut cmd = Command::new(tool("nginx"));
    cmd.arg("-p")
        .arg(prefix)
        .arg("-c")
        .arg(conf)
        .arg("-e")
        .arg(prefix.join("error.log"))
        .arg("-g")
        .arg(format!(
            "pid {}; {extra_global}",
            prefix.join("nginx.pid").display()
        ));
    cmd
}

/// The text of the `location PATH {` block of nginx.conf.
fn location_block<'a>(conf: &'a str, path: &str) -> &'a str {
    let head = format!("location {path} {{");
    let start = conf
        .find(&head)
        .unwrap_or_else(|| panic!("nginx.conf has no `{head}`"));
    let len = conf[start..]
        .find("\n        }")
        .expect("location block end");
    &conf[start..start + len]
}

#[test]
fn nginx_config_tests_ok_with_loopback_upstreams() {
    let conf = read("deploy/nginx.conf");
    let v1 = location_block(&conf, "/v1/");
    let admin = location_block(&conf, "/admin/");
    assert!(
        v1.contains("non_idempotent") && v1.contains("http_503"),
        "classify retries:\n{v1}"
    );
    assert!(
        !admin.contains("non_idempotent"),
        "admin routes must not resend POSTs:\n{admin}"
    );
    for needle in [
        "keepalive ",
        "proxy_http_version 1.1;",
        "proxy_set_header Connection \"\";",
        "client_max_body_size 64m;",
    ] {
        assert!(conf.contains(needle), "nginx.conf lacks `{needle}`");
    }

    let dir = tempfile::tempdir().unwrap();
    let servers: Vec<String> = (0..3).map(|i| format!("127.0.0.1:{}", 18081 + i)).collect();
    let path = loopback_nginx_conf(dir.path(), &servers, free_port());
    let out = run(nginx_cmd(dir.path(), &path, "").arg("-t"));
    assert!(out.status.success(), "nginx -t:\n{}", text(&out));

    // nginx -t itself fails on a broken file.
    let broken = std::fs::read_to_string(&path)
        .unwrap()
        .replace("keepalive 32;", "keepalive thirty-two;");
    std::fs::write(&path, broken).unwrap();
    let out = run(nginx_cmd(dir.path(), &path, "").arg("-t"));
    assert!(
        !out.status.success(),
        "nginx -t passed a broken file:\n{}",
        text(&out)
    );
}

/// A one-answer HTTP server on loopback: every request gets `status`; counts
/// the requests it saw.
struct Backend {
    port: u16,
    hits: Arc<AtomicUsize>,
}

fn backend(status: u16, body: &'static str) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let seen = seen.clone();
            std::thread::spawn(move || {
                let _ = serve_one(stream, status, body, &seen);
            });
        }
    });
    Backend { port, hits }
}

fn serve_one(
    stream: TcpStream,
    status: u16,
    body: &str,
    seen: &AtomicUsize,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut len = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut request_body = vec![0u8; len];
    reader.read_exact(&mut request_body)?;
    seen.fetch_add(1, Ordering::SeqCst);
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

/// Status code of a request through nginx.
fn request(port: u16, method: &str, path: &str) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let body = r#"{"inputs": "x"}"#;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: lb\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad answer: {answer}"))
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn nginx_retries_classify_but_not_admin_posts() {
    // One replica draining (503 to everything), one healthy.
    let draining = backend(503, "draining");
    let healthy = backend(200, "ok");
    let dir = tempfile::tempdir().unwrap();
    let listen = free_port();
    // max_fails=0: the draining one stays in the rotation, so round robin
    // sends every other first try to it.
    let servers = [draining.port, healthy.port].map(|p| format!("127.0.0.1:{p} max_fails=0"));
    let path = loopback_nginx_conf(dir.path(), &servers, listen);
    let child = nginx_cmd(dir.path(), &path, "daemon off; master_process off;")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nginx");
    let mut nginx = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", listen)).is_err() {
        if let Some(status) = nginx.0.try_wait().unwrap() {
            let mut err = String::new();
            nginx
                .0
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("nginx exited ({status}): {err}");
        }
        assert!(
            Instant::now() < deadline,
            "nginx did not listen on {listen}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Classify POSTs: each that meets the draining replica goes on to the
    // healthy one.
    for _ in 0..6 {
        assert_eq!(request(listen, "POST", "/v1/tasks/t/classify"), 200);
    }
    let tried_draining = draining.hits.load(Ordering::SeqCst);
    assert!(
        tried_draining >= 2,
        "round robin never reached the draining replica ({tried_draining})"
    );
    assert_eq!(healthy.hits.load(Ordering::SeqCst), 6);

    // Admin POSTs: a 503 comes back as it is, never resent.
    let before = (
        draining.hits.load(Ordering::SeqCst),
        healthy.hits.load(Ordering::SeqCst),
    );
    let codes: Vec<u16> = (0..6)
        .map(|_| request(listen, "POST", "/admin/tasks/t"))
        .collect();
    let after = (
        draining.hits.load(Ordering::SeqCst),
        healthy.hits.load(Ordering::SeqCst),
    );
    let (to_draining, to_healthy) = (after.0 - before.0, after.1 - before.1);
    assert_eq!(
        to_draining + to_healthy,
        6,
        "an admin POST was sent twice: {codes:?}"
    );
    assert_eq!(
        codes.iter().filter(|&&c| c == 503).count(),
        to_draining,
        "{codes:?}"
    );
    assert!(to_draining >= 2, "{codes:?}");

    // Idempotent admin PUTs are retried like reads.
    for _ in 0..4 {
        assert_eq!(request(listen, "PUT", "/admin/tasks/t"), 200);
    }
    drop(nginx);
}

// --- compose -------------------------------------------------------------

#[test]
fn compose_file_parses_and_matches_nginx() {
    let python = tool("python");
    let check = r#"
import sys, yaml
d = yaml.safe_load(open(sys.argv[1]))
s = d["services"]
replicas = sorted(k for k in s if k.startswith("softprompt-"))
assert replicas == ["softprompt-1", "softprompt-2", "softprompt-3"], replicas
for name in ["nginx", "s3", "s3-init"]:
    assert name in s, name
for r in replicas:
    svc = s[r]
    assert svc["healthcheck"]["test"], r
    env = svc["environment"]
    assert env["SOFTPROMPT_PROMPTS"].startswith("s3://"), env
    for k in ["AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ALLOW_HTTP", "SOFTPROMPT_SYNC_INTERVAL_MS", "SOFTPROMPT_ADMIN_TOKEN_FILE"]:
        assert k in env, (r, k)
    assert svc["secrets"] == ["admin_token"], r
    assert svc["depends_on"]["s3-init"]["condition"] == "service_completed_successfully", r
for r in replicas:
    assert s["nginx"]["depends_on"][r]["condition"] == "service_healthy", r
assert s["s3-init"]["depends_on"]["s3"]["condition"] == "service_healthy"
assert "admin_token" in d["secrets"]
print(" ".join(replicas))
"#;
    let out = run(Command::new(&python)
        .arg("-c")
        .arg(check)
        .arg(root().join("deploy/compose.yaml")));
    let said = text(&out);
    assert!(
        out.status.success(),
        "deploy/compose.yaml check failed (PyYAML comes with .venv-test: bash scripts/test_deps.sh):\n{said}"
    );

    // nginx's upstream names the same three replicas, on the port they serve.
    let conf = read("deploy/nginx.conf");
    let block = &conf[conf.find(BEGIN).unwrap()..conf.find(END).unwrap()];
    let hosts: Vec<&str> = block
        .lines()
        .filter_map(|l| l.trim().strip_prefix("server "))
        .map(|l| l.split_whitespace().next().unwrap().trim_end_matches(';'))
        .collect();
    assert_eq!(
        hosts,
        [
            "softprompt-1:8080",
            "softprompt-2:8080",
            "softprompt-3:8080"
        ]
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "softprompt-1 softprompt-2 softprompt-3"
    );
}

// --- healthcheck script --------------------------------------------------

#[test]
fn healthcheck_script_tells_ok_from_not() {
    let script = root().join("deploy/healthcheck.sh");
    let probe = |port: u16| {
        run(Command::new("bash")
            .arg(&script)
            .env("SOFTPROMPT_ADDR", format!("0.0.0.0:{port}")))
        .status
        .success()
    };
    assert!(probe(backend(200, "{}").port), "200 must be healthy");
    assert!(!probe(backend(503, "{}").port), "503 must be unhealthy");
    assert!(!probe(free_port()), "nothing listening must be unhealthy");

    for script in ["deploy/healthcheck.sh", "deploy/local-base-images.sh"] {
        let out = run(Command::new("bash").arg("-n").arg(root().join(script)));
        assert!(out.status.success(), "bash -n {script}:\n{}", text(&out));
    }
}
