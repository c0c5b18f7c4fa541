//! The S3 prompt store against moto_server on loopback: round trips,
//! version tokens, PEFT adapter directories, corrupt objects, an
//! unreachable store; and the poller (StoreSync) of two "replicas" in one
//! process converging on one bucket.
//!
//! Needs moto_server: scripts/test_deps.sh installs it into .venv-test,
//! scripts/test.sh points SOFTPROMPT_TEST_BIN at it.

mod s3_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjectPath;
use s3_support::{Moto, free_port, raw, store};
use softprompt::model::Model;
use softprompt::registry::Registry;
use softprompt::server::sync::{RoundError, StoreHealth, StoreSync};
use softprompt::store::{PromptStore, StoreError};
use softprompt::task::{Limits, Task, native, peft};

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/adapters")
        .join(name)
}

fn task(adapter: &str) -> Task {
    peft::read_dir(&fixture(adapter), None).unwrap()
}

fn ids(entries: &[softprompt::store::StoreEntry]) -> Vec<&str> {
    entries.iter().map(|e| e.id.as_str()).collect()
}

fn token_of<'a>(entries: &'a [softprompt::store::StoreEntry], id: &str) -> &'a str {
    &entries
        .iter()
        .find(|e| e.id == id)
        .unwrap_or_else(|| panic!("{id} listed"))
        .token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_list_load_replace_delete_round_trip() {
    let moto = Moto::start().await;
    moto.create_bucket("roundtrip").await;
    let s = store(&moto.endpoint(), "roundtrip", "team/tasks");
    assert_eq!(s.location(), "s3://roundtrip/team/tasks");
    assert!(s.list().await.unwrap().is_empty());

    let a = task("pt_random_2");
    let b = task("prefix_2");
    let written = s.put("alpha", &a).await.unwrap();
    let listed = s.list().await.unwrap();
    assert_eq!(ids(&listed), ["alpha"]);
    assert_eq!(
        token_of(&listed, "alpha"),
        written,
        "put returns the token list shows"
    );
    assert_eq!(s.load("alpha").await.unwrap().version, a.version);

    // Same content again: S3's ETag is the content's MD5, so the token
    // stays; new content changes it.
    assert_eq!(s.put("alpha", &a).await.unwrap(), written);
    let replaced = s.put("alpha", &b).await.unwrap();
    assert_ne!(replaced, written, "a replace changes the version token");
    assert_eq!(token_of(&s.list().await.unwrap(), "alpha"), replaced);
    assert_eq!(s.load("alpha").await.unwrap().version, b.version);

    s.put("beta", &a).await.unwrap();
    assert_eq!(ids(&s.list().await.unwrap()), ["alpha", "beta"]);

    // Another prefix of the same bucket is another store.
    let other = store(&moto.endpoint(), "roundtrip", "team/tasks-2");
    assert!(other.list().await.unwrap().is_empty());
    let root = store(&moto.endpoint(), "roundtrip", "");
    assert!(
        root.list().await.unwrap().is_empty(),
        "objects two levels down are not tasks of the root"
    );

    assert!(s.delete("alpha").await.unwrap());
    assert!(
        !s.delete("alpha").await.unwrap(),
        "second delete: not there"
    );
    assert_eq!(ids(&s.list().await.unwrap()), ["beta"]);
    assert!(matches!(
        s.load("alpha").await,
        Err(StoreError::NotFound(_))
    ));
    // Invalid ids never reach a key.
    assert!(matches!(s.load("../x").await, Err(StoreError::Registry(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peft_adapter_directories_load_and_an_upload_replaces_them() {
    let moto = Moto::start().await;
    moto.create_bucket("peft").await;
    let s = store(&moto.endpoint(), "peft", "p");
    let objects = raw(&moto.endpoint(), "peft");
    let put = |key: &str, bytes: Vec<u8>| {
        let objects = objects.clone();
        let key = ObjectPath::from(key);
        async move { objects.put(&key, bytes.into()).await.unwrap() }
    };
    let dir = fixture("ptune_lstm_3");
    put(
        "p/lstm/adapter_config.json",
        std::fs::read(dir.join(peft::CONFIG_FILE)).unwrap(),
    )
    .await;
    put(
        "p/lstm/adapter_model.safetensors",
        std::fs::read(dir.join(peft::WEIGHTS_FILE)).unwrap(),
    )
    .await;
    let listed = s.list().await.unwrap();
    assert_eq!(ids(&listed), ["lstm"]);
    let before = token_of(&listed, "lstm").to_string();
    let loaded = s.load("lstm").await.unwrap();
    assert_eq!(loaded.version, task("ptune_lstm_3").version);

    // labels.json is part of the task: adding it changes token and labels.
    put("p/lstm/labels.json", br#"["neg","neu","pos"]"#.to_vec()).await;
    let after = token_of(&s.list().await.unwrap(), "lstm").to_string();
    assert_ne!(after, before);
    assert_eq!(
        s.load("lstm").await.unwrap().meta.labels,
        ["neg", "neu", "pos"]
    );
    // A labels.json that is not a list of names is an error, not LABEL_i.
    put("p/lstm/labels.json", b"{\"0\": \"neg\"}".to_vec()).await;
    let err = s.load("lstm").await.err().expect("bad labels.json refused");
    assert!(
        matches!(err, StoreError::Task { .. }) && err.to_string().contains("labels.json"),
        "{err}"
    );

    // An upload stores the task native and removes the directory.
    let native_task = task("pt_text_3");
    s.put("lstm", &native_task).await.unwrap();
    assert_eq!(s.load("lstm").await.unwrap().version, native_task.version);
    let left: Vec<_> = {
        use futures_util::TryStreamExt;
        objects
            .list(Some(&ObjectPath::from("p")))
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
    };
    // One version of the task (the journal's records aside).
    let keys: Vec<String> = left
        .iter()
        .map(|m| m.location.to_string())
        .filter(|k| !k.starts_with("p/_changes/"))
        .collect();
    assert_eq!(keys, ["p/lstm.safetensors"]);

    // Delete removes the adapter directory too.
    put(
        "p/d/adapter_config.json",
        std::fs::read(dir.join(peft::CONFIG_FILE)).unwrap(),
    )
    .await;
    put(
        "p/d/adapter_model.safetensors",
        std::fs::read(dir.join(peft::WEIGHTS_FILE)).unwrap(),
    )
    .await;
    assert!(s.delete("d").await.unwrap());
    assert_eq!(ids(&s.list().await.unwrap()), ["lstm"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_objects_are_clear_task_errors() {
    let moto = Moto::start().await;
    moto.create_bucket("bad").await;
    let s = store(&moto.endpoint(), "bad", "t");
    let objects = raw(&moto.endpoint(), "bad");
    objects
        .put(
            &ObjectPath::from("t/broken.safetensors"),
            b"not a safetensors file".to_vec().into(),
        )
        .await
        .unwrap();
    let mut good = native::to_bytes(&task("pt_random_2")).unwrap();
    objects
        .put(&ObjectPath::from("t/good.safetensors"), good.clone().into())
        .await
        .unwrap();
    good.truncate(good.len() / 2);
    objects
        .put(&ObjectPath::from("t/torn.safetensors"), good.into())
        .await
        .unwrap();
    let dir = fixture("prefix_2");
    objects
        .put(
            &ObjectPath::from("t/half/adapter_config.json"),
            std::fs::read(dir.join(peft::CONFIG_FILE)).unwrap().into(),
        )
        .await
        .unwrap();
    // Not tasks: ignored by the listing.
    objects
        .put(&ObjectPath::from("t/README.md"), b"hi".to_vec().into())
        .await
        .unwrap();
    objects
        .put(
            &ObjectPath::from("t/.hidden.safetensors"),
            b"x".to_vec().into(),
        )
        .await
        .unwrap();

    assert_eq!(
        ids(&s.list().await.unwrap()),
        ["broken", "good", "half", "torn"]
    );
    assert!(s.load("good").await.is_ok());
    for (id, needle) in [
        ("broken", "broken"),
        ("torn", "torn"),
        ("half", "adapter_model.safetensors"),
    ] {
        let err = s.load(id).await.err().expect("corrupt task refused");
        assert!(matches!(err, StoreError::Task { .. }), "{id}: {err:?}");
        assert!(
            !err.is_unavailable(),
            "{id}: a bad task is not a store outage"
        );
        let msg = err.to_string();
        assert!(msg.contains(id) && msg.contains(needle), "{id}: {msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_fails_fast_with_a_clear_error() {
    // Nobody listens on this port.
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let s = store(&endpoint, "gone", "tasks");
    let started = Instant::now();
    let err = s.list().await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert!(err.is_unavailable(), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("s3://gone/tasks") && msg.contains("list"),
        "{msg}"
    );
    let err = s.put("x", &task("pt_random_2")).await.unwrap_err();
    assert!(
        err.is_unavailable() && err.to_string().contains("put"),
        "{err}"
    );

    // A missing bucket is reported as such.
    let moto = Moto::start().await;
    let err = store(&moto.endpoint(), "no-such-bucket", "")
        .list()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("s3://no-such-bucket"), "{err}");

    // Plain HTTP must be allowed explicitly.
    let builder = object_store::aws::AmazonS3Builder::new().with_endpoint(&endpoint);
    let err = softprompt::store::ObjectPromptStore::s3(builder, "b", "p")
        .err()
        .expect("refused");
    assert!(err.to_string().contains("AWS_ALLOW_HTTP"), "{err}");
}

/// Two syncers ("replicas") over one bucket, each with its own registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_converge_keep_the_last_good_version_and_do_not_reload_their_own_writes() {
    let moto = Moto::start().await;
    moto.create_bucket("sync").await;
    let model = Arc::new(
        Model::load(
            &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-bert"),
            &Device::Cpu,
        )
        .unwrap(),
    );
    let replica = || {
        let store: Arc<dyn PromptStore> = Arc::new(store(&moto.endpoint(), "sync", "tasks"));
        let registry = Arc::new(Registry::new(model.clone(), Limits::default()));
        let health = Arc::new(StoreHealth::new(store.location()));
        (
            StoreSync::new(store, registry.clone(), health.clone()),
            registry,
            health,
        )
    };
    let (a, reg_a, _) = replica();
    let (b, reg_b, health_b) = replica();
    let (t1, t2) = (task("pt_random_2"), task("prefix_2"));

    // An upload through A: A serves it at once, B after its next round,
    // and A's own round does not reload it.
    let prepared = reg_a.prepare("t", &t1).unwrap();
    assert!(a.put("t", &t1, prepared).await.unwrap().is_none());
    let r = b.round(false).await.unwrap();
    assert_eq!(r.added, ["t"]);
    assert_eq!(reg_b.get("t").unwrap().version, t1.version);
    assert!(
        a.round(false).await.unwrap().is_empty(),
        "no reload of its own upload"
    );
    assert!(b.round(false).await.unwrap().is_empty(), "nothing changed");

    // Replace through A.
    let prepared = reg_a.prepare("t", &t2).unwrap();
    assert!(a.put("t", &t2, prepared).await.unwrap().is_some());
    assert_eq!(b.round(false).await.unwrap().replaced, ["t"]);
    assert_eq!(reg_b.get("t").unwrap().version, t2.version);
    assert!(a.round(false).await.unwrap().is_empty());

    // Someone overwrites the task with garbage: B keeps serving t2, says
    // so once, and counts it.
    let objects = raw(&moto.endpoint(), "sync");
    objects
        .put(
            &ObjectPath::from("tasks/t.safetensors"),
            b"garbage".to_vec().into(),
        )
        .await
        .unwrap();
    let r = b.round(false).await.unwrap();
    assert_eq!(r.failed.len(), 1, "{r:?}");
    assert!(r.failed[0].1.contains("\"t\""), "{:?}", r.failed);
    assert_eq!(
        reg_b.get("t").unwrap().version,
        t2.version,
        "last good version still served"
    );
    assert_eq!(health_b.snapshot().failing_tasks, 1);
    assert!(
        b.round(false).await.unwrap().is_empty(),
        "a known bad version is not retried"
    );
    // Repaired in the store: picked up, no longer failing.
    b.store().put("t", &t1).await.unwrap();
    assert_eq!(b.round(false).await.unwrap().replaced, ["t"]);
    assert_eq!(health_b.snapshot().failing_tasks, 0);

    // Delete through A: B drops it.
    assert_eq!(a.delete("t").await.unwrap(), (true, true));
    assert_eq!(b.round(false).await.unwrap().removed, ["t"]);
    assert!(reg_b.get("t").is_none());
    let snap = health_b.snapshot();
    assert_eq!(snap.reachable, Some(true));
    assert!(snap.last_sync_age.unwrap() < Duration::from_secs(30));

    // Strict start-up refuses a bad task before applying anything.
    objects
        .put(
            &ObjectPath::from("tasks/bad.safetensors"),
            b"garbage".to_vec().into(),
        )
        .await
        .unwrap();
    b.store().put("fine", &t1).await.unwrap();
    let (c, reg_c, _) = replica();
    match c.round(true).await {
        Err(RoundError::Strict(e)) => assert!(e.to_string().contains("\"bad\""), "{e}"),
        other => panic!("strict round: {other:?}"),
    }
    assert!(reg_c.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_changes_nothing_served_and_is_reported() {
    let moto = Moto::start().await;
    moto.create_bucket("out").await;
    let model = Arc::new(
        Model::load(
            &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-bert"),
            &Device::Cpu,
        )
        .unwrap(),
    );
    let mut relay = s3_support::Relay::start(moto.port).await;
    let s: Arc<dyn PromptStore> = Arc::new(store(&relay.endpoint(), "out", "x"));
    s.put("kept", &task("pt_text_3")).await.unwrap();
    let registry = Arc::new(Registry::new(model, Limits::default()));
    let health = Arc::new(StoreHealth::new(s.location()));
    let sync = StoreSync::new(s.clone(), registry.clone(), health.clone());
    assert_eq!(sync.round(false).await.unwrap().added, ["kept"]);

    relay.cut();
    match sync.round(false).await {
        Err(RoundError::Unavailable(e)) => assert!(e.to_string().contains("s3://out/x"), "{e}"),
        other => panic!("round with the store down: {other:?}"),
    }
    assert!(registry.get("kept").is_some(), "still served");
    let snap = health.snapshot();
    assert_eq!(snap.reachable, Some(false));
    assert!(snap.error.as_deref().unwrap().contains("list"), "{snap:?}");
    assert!(health.is_unreachable());

    // Back: a task added meanwhile (directly in the store) is picked up.
    store(&moto.endpoint(), "out", "x")
        .put("new", &task("prefix_2"))
        .await
        .unwrap();
    relay.resume().await;
    let r = sync.round(false).await.unwrap();
    assert_eq!(r.added, ["new"]);
    assert_eq!(health.snapshot().reachable, Some(true));
    assert!(health.snapshot().error.is_none());
}

/// The same poller over a directory store (the default): files dropped in,
/// replaced or removed by hand are picked up without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_store_is_polled_the_same_way() {
    let model = Arc::new(
        Model::load(
            &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-bert"),
            &Device::Cpu,
        )
        .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn PromptStore> =
        Arc::new(softprompt::store::DirStore::open(dir.path()).unwrap());
    let registry = Arc::new(Registry::new(model, Limits::default()));
    let health = Arc::new(StoreHealth::new(store.location()));
    let sync = StoreSync::new(store.clone(), registry.clone(), health.clone());
    assert!(sync.round(false).await.unwrap().is_empty());

    let (a, b) = (task("pt_random_2"), task("prefix_2"));
    native::write_file(&dir.path().join("dropped.safetensors"), &a).unwrap();
    assert_eq!(sync.round(false).await.unwrap().added, ["dropped"]);
    native::write_file(&dir.path().join("dropped.safetensors"), &b).unwrap();
    assert_eq!(sync.round(false).await.unwrap().replaced, ["dropped"]);
    assert_eq!(registry.get("dropped").unwrap().version, b.version);
    // Its own upload is not reloaded, even though the file is new.
    let prepared = registry.prepare("dropped", &a).unwrap();
    sync.put("dropped", &a, prepared).await.unwrap();
    assert!(sync.round(false).await.unwrap().is_empty());
    std::fs::remove_file(dir.path().join("dropped.safetensors")).unwrap();
    assert_eq!(sync.round(false).await.unwrap().removed, ["dropped"]);
    assert!(registry.is_empty());
    assert_eq!(health.snapshot().reachable, Some(true));
}
