//! The registry as a bounded cache over the store (`serve --task-memory`):
//! every stored task is served however small the budget (cold ones are
//! loaded on their first request, once however many requests wait), the
//! pinned task stays, listings say what is resident; a store outage
//! leaves resident tasks serving and answers cold ones 503, evicting
//! nothing; a flood of distinct cold tasks is refused, not queued.

mod s3_support;
mod server_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use candle_core::Device;
use serde_json::{Value, json};
use server_support::*;
use softprompt::model::Model;
use softprompt::registry::Registry;
use softprompt::server::loader::{LoadError, Loader};
use softprompt::server::sync::{StoreHealth, StoreSync};
use softprompt::store::{DirStore, PromptStore, StoreEntry, StoreError};
use softprompt::task::{Limits, Task, peft};

/// A counter's value in a Prometheus text page (0 when absent).
fn counter(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

async fn metrics_page(s: &Running) -> String {
    s.get("/metrics").await.text().await.unwrap()
}

async fn resident(s: &Running) -> Vec<String> {
    let list: Value = s.get("/v1/tasks").await.json().await.unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .filter(|t| t["resident"] == json!(true))
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_byte_budget_still_serves_every_stored_task_and_keeps_the_pinned_one() {
    let all: Vec<&str> = SHALLOW.iter().chain(DEEP).copied().collect();
    let store = store_with(&all);
    let mut f = flags(store.path());
    f.extend(
        [
            "--task-memory",
            "1",
            "--pin",
            "prefix_2",
            "--sync-interval-ms",
            "0",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let s = start(&f).await;
    let reference = Reference::new();
    let input = In::text("this is every low cl");

    // The listing shows every stored task; only the pin (and what the
    // start-up round loaded before the budget filled) is resident.
    let list: Value = s.get("/v1/tasks").await.json().await.unwrap();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    let mut sorted = all.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
    assert!(resident(&s).await.contains(&"prefix_2".to_string()));

    // Every task, twice round: each request is right, none is 404, and
    // after each only the pin and the task just used (or, after using the
    // pin, the one before) are resident.
    for round in 0..2 {
        for &id in &all {
            let resp = s.classify(id, &json!({"inputs": input.json()})).await;
            assert_eq!(resp.status(), 200, "{id}, round {round}");
            let got: Value = resp.json().await.unwrap();
            reference.check(&fixture_task(id), &input, &got[0], true);
            // Loading a task evicts every other unpinned one (the budget
            // is one byte); using the resident pin evicts nothing.
            let r = resident(&s).await;
            assert!(
                r.len() <= 2 && r.contains(&"prefix_2".to_string()) && r.contains(&id.to_string()),
                "after {id}: {r:?}"
            );
        }
    }
    // A cold task's description loads it too.
    let cold = "pt_text_3";
    assert!(!resident(&s).await.contains(&cold.to_string()));
    let info: Value = s
        .get(&format!("/v1/tasks/{cold}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(info["version"], fixture_task(cold).version);
    // Unknown ids are still 404.
    let (status, kind, _) = error_of(s.classify("nope", &json!({"inputs": "x"})).await).await;
    assert_eq!((status, kind.as_str()), (404, "not_found"));

    // Concurrent requests for one cold task share one store read.
    let cold = "ptune_lstm_3";
    assert!(!resident(&s).await.contains(&cold.to_string()));
    let before = counter(
        &metrics_page(&s).await,
        "softprompt_task_loads_total{outcome=\"loaded\"}",
    );
    let body = json!({"inputs": input.json()});
    let answers = futures_util::future::join_all((0..8).map(|_| s.classify(cold, &body))).await;
    assert!(answers.iter().all(|r| r.status() == 200));
    let page = metrics_page(&s).await;
    let after = counter(&page, "softprompt_task_loads_total{outcome=\"loaded\"}");
    assert_eq!(after - before, 1.0, "one load for 8 concurrent requests");
    assert!(
        counter(&page, "softprompt_task_evictions_total") >= 10.0,
        "{page}"
    );
    assert!(page.contains("softprompt_task_load_seconds"), "{page}");
    assert!(page.contains("softprompt_task_bytes_resident"), "{page}");
    // Paging: two at a time, in id order.
    let first: Value = s.get("/v1/tasks?limit=2").await.json().await.unwrap();
    let next: Value = s
        .get(&format!(
            "/v1/tasks?limit=2&after={}",
            first[1]["id"].as_str().unwrap()
        ))
        .await
        .json()
        .await
        .unwrap();
    let paged: Vec<&str> = first
        .as_array()
        .unwrap()
        .iter()
        .chain(next.as_array().unwrap())
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(paged, sorted[..4]);
}

fn tiny() -> Arc<Model> {
    Arc::new(Model::load(&tiny_model_dir(), &Device::Cpu).unwrap())
}

/// A registry over `store` with room for one task (a one-byte budget:
/// every load evicts the task loaded before), and its syncer.
fn one_task_cache(store: Arc<dyn PromptStore>) -> (Arc<Registry>, Arc<StoreSync>) {
    let registry = Arc::new(Registry::with_budget(
        tiny(),
        Limits::default(),
        Some(1),
        Vec::new(),
    ));
    let health = Arc::new(StoreHealth::new(store.location()));
    let sync = Arc::new(StoreSync::new(store, registry.clone(), health));
    (registry, sync)
}

fn fixture(name: &str) -> Task {
    peft::read_dir(&adapter_dir(name), None).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_store_down_resident_tasks_serve_cold_ones_get_503_and_nothing_is_evicted() {
    let moto = s3_support::Moto::start().await;
    moto.create_bucket("cache").await;
    let mut relay = s3_support::Relay::start(moto.port).await;
    let store: Arc<dyn PromptStore> = Arc::new(s3_support::store(&relay.endpoint(), "cache", "t"));
    for id in ["a", "b"] {
        store.put(id, &fixture("pt_text_3")).await.unwrap();
    }
    let (registry, sync) = one_task_cache(store.clone());
    sync.round(false).await.unwrap();
    let loader = Loader::new(sync.clone(), 4);
    loader.resolve("a").await.unwrap();
    loader.resolve("b").await.unwrap();
    assert!(registry.get("a").is_none() && registry.get("b").is_some());

    relay.cut();
    assert!(loader.resolve("b").await.is_ok(), "resident: served");
    match loader.resolve("a").await {
        Err(e @ LoadError::StoreUnavailable { .. }) => {
            assert!(e.to_string().contains("\"a\""), "{e}")
        }
        other => panic!(
            "cold task with the store down: {:?}",
            other.map(|t| t.id.clone())
        ),
    }
    assert!(
        registry.get("b").is_some(),
        "nothing evicted for a failed load"
    );
    // Remembered: answered at once, without waiting on the store.
    let t = std::time::Instant::now();
    assert!(matches!(
        loader.resolve("a").await,
        Err(LoadError::StoreUnavailable { .. })
    ));
    assert!(t.elapsed() < Duration::from_millis(500));

    relay.resume().await;
    tokio::time::sleep(softprompt::server::loader::UNAVAILABLE_BACKOFF).await;
    assert_eq!(loader.resolve("a").await.unwrap().id, "a");
    assert!(registry.get("b").is_none(), "b made room");
    assert!(matches!(
        loader.resolve("zzz").await,
        Err(LoadError::NotFound(_))
    ));
    // Put into the store by another replica right after that 404: once this
    // replica's round has seen it, it is served at once, whatever the 404
    // back-off says.
    store.put("zzz", &fixture("pt_text_3")).await.unwrap();
    sync.round(false).await.unwrap();
    assert_eq!(loader.resolve("zzz").await.unwrap().id, "zzz");
}

/// A directory store whose reads take a while and that counts how many run
/// at once.
struct SlowStore {
    inner: DirStore,
    running: AtomicUsize,
    most: AtomicUsize,
}

#[async_trait::async_trait]
impl PromptStore for SlowStore {
    async fn list(&self) -> Result<Vec<StoreEntry>, StoreError> {
        self.inner.list().await
    }
    async fn load(&self, id: &str) -> Result<Task, StoreError> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = self.inner.load(id).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        r
    }
    async fn put(&self, id: &str, task: &Task) -> Result<String, StoreError> {
        self.inner.put(id, task).await
    }
    async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        self.inner.delete(id).await
    }
    fn location(&self) -> String {
        self.inner.location()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_distinct_cold_tasks_is_refused_beyond_the_load_bound() {
    let dir = tempfile::tempdir().unwrap();
    let inner = DirStore::open(dir.path()).unwrap();
    for i in 0..24 {
        inner
            .put(&format!("t{i}"), &fixture("pt_random_2"))
            .await
            .unwrap();
    }
    let slow = Arc::new(SlowStore {
        inner,
        running: AtomicUsize::new(0),
        most: AtomicUsize::new(0),
    });
    let (registry, sync) = one_task_cache(slow.clone());
    let loader = Arc::new(Loader::new(sync, 3));
    let results = futures_util::future::join_all((0..24).map(|i| {
        let loader = loader.clone();
        async move { loader.resolve(&format!("t{i}")).await }
    }))
    .await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let busy = results
        .iter()
        .filter(|r| matches!(r, Err(LoadError::Busy(3))))
        .count();
    assert_eq!(ok + busy, 24, "every request answered: loaded or busy");
    assert!((1..=3).contains(&ok) && busy >= 21, "ok {ok}, busy {busy}");
    assert!(
        slow.most.load(Ordering::SeqCst) <= 3,
        "at most 3 store reads at once"
    );
    assert!(registry.len() <= 1, "the budget holds");
    // Busy is not remembered: the same task loads once the flood is over.
    let first_busy = results.iter().position(|r| r.is_err()).unwrap();
    assert!(loader.resolve(&format!("t{first_busy}")).await.is_ok());
}

/// Ids of a round's report in id order (loads finish in any order).
fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

/// A directory store that counts full listings.
struct CountingStore {
    inner: DirStore,
    lists: AtomicUsize,
}

#[async_trait::async_trait]
impl PromptStore for CountingStore {
    async fn list(&self) -> Result<Vec<StoreEntry>, StoreError> {
        self.lists.fetch_add(1, Ordering::SeqCst);
        self.inner.list().await
    }
    async fn load(&self, id: &str) -> Result<Task, StoreError> {
        self.inner.load(id).await
    }
    async fn put(&self, id: &str, task: &Task) -> Result<String, StoreError> {
        self.inner.put(id, task).await
    }
    async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        self.inner.delete(id).await
    }
    async fn changes_after(
        &self,
        after: &str,
    ) -> Result<Option<Vec<softprompt::store::Change>>, StoreError> {
        self.inner.changes_after(after).await
    }
    async fn prune_changes(&self, before: &str) -> Result<(), StoreError> {
        self.inner.prune_changes(before).await
    }
    fn location(&self) -> String {
        self.inner.location()
    }
}

/// Replicas of a large store (here: the policy says every store is large)
/// keep current through the change journal without listing the store:
/// a replace, a delete and an add made through another replica are each
/// applied by the next round, with no LIST; a file copied in by hand
/// (no journal record) waits for the next full listing, as documented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_follow_the_change_journal_without_listing_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let seed = DirStore::open(dir.path()).unwrap();
    seed.put("x", &fixture("pt_text_3")).await.unwrap();
    seed.put("y", &fixture("prefix_2")).await.unwrap();
    let counting = Arc::new(CountingStore {
        inner: DirStore::open(dir.path()).unwrap(),
        lists: AtomicUsize::new(0),
    });
    let model = tiny();
    let replica = |store: Arc<dyn PromptStore>| {
        let registry = Arc::new(Registry::new(model.clone(), Limits::default()));
        let health = Arc::new(StoreHealth::new(store.location()));
        let sync = StoreSync::new(store, registry.clone(), health)
            .with_listing_policy(0, Duration::from_secs(3600));
        (registry, sync)
    };
    let (reg_b, b) = replica(counting.clone());
    let (_, a) = replica(Arc::new(DirStore::open(dir.path()).unwrap()));
    a.round(false).await.unwrap();
    // B's first round lists the store (start-up).
    assert_eq!(sorted(b.round(false).await.unwrap().added), ["x", "y"]);
    assert_eq!(counting.lists.load(Ordering::SeqCst), 1);
    assert!(b.round(false).await.unwrap().is_empty(), "nothing changed");

    let model_ref = reg_b.model().clone();
    let prepare = |id: &str, t: &Task| {
        Registry::new(model_ref.clone(), Limits::default())
            .prepare(id, t)
            .unwrap()
    };
    let new_x = fixture("ptune_mlp_2");
    a.put("x", &new_x, prepare("x", &new_x)).await.unwrap();
    assert_eq!(b.round(false).await.unwrap().replaced, ["x"]);
    assert_eq!(reg_b.get("x").unwrap().version, new_x.version);

    a.delete("y").await.unwrap();
    assert_eq!(b.round(false).await.unwrap().removed, ["y"]);

    let z = fixture("prefix_proj_3");
    a.put("z", &z, prepare("z", &z)).await.unwrap();
    assert_eq!(b.round(false).await.unwrap().added, ["z"]);
    assert_eq!(
        counting.lists.load(Ordering::SeqCst),
        1,
        "journal rounds do not list the store"
    );
    let ids: Vec<String> = b.catalog().iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids, ["x", "z"], "the catalog follows the journal");

    // By hand, bypassing the journal: not seen until a full listing.
    std::fs::copy(
        dir.path().join("z.safetensors"),
        dir.path().join("w.safetensors"),
    )
    .unwrap();
    assert!(b.round(false).await.unwrap().is_empty());
    let (_, c) = replica(counting.clone());
    assert_eq!(sorted(c.round(false).await.unwrap().added), ["w", "x", "z"]);
}

/// A replica in front of a store too large to list within
/// `--listing-wait-ms` (here: a listing made to take 8 s) is ready without
/// it: its pinned task is resident, a cold task is served right, and the
/// listing endpoint says `catalog_loading` (not a partial list) until the
/// listing, continued in the background, ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_slow_to_list_does_not_hold_the_replica_out_of_service() {
    let all: Vec<&str> = SHALLOW.iter().chain(DEEP).copied().collect();
    let store = store_with(&all);
    let mut f = flags(store.path());
    f.extend(
        [
            "--task-memory",
            "1",
            "--pin",
            "prefix_2",
            "--listing-wait-ms",
            "100",
            "--faults",
            "store-list-delay-ms=8000",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let s = start(&f).await;
    // Ready once warmed up (a few ms), well before the listing ends.
    let ready = loop {
        let ready: Value = s.get("/ready").await.json().await.unwrap();
        if ready["status"] != json!("warming_up") {
            break ready;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(ready["ready"], json!(true), "{ready}");
    assert_eq!(ready["store"]["listed_tasks"], Value::Null, "{ready}");
    let ids = |s: &Running| -> Vec<String> {
        let mut ids: Vec<String> = s
            .server
            .registry()
            .list()
            .iter()
            .map(|t| t.id.clone())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&s), ["prefix_2"], "the pin is loaded before ready");

    let (status, kind, _) = error_of(s.get("/v1/tasks").await).await;
    assert_eq!((status, kind.as_str()), (503, "catalog_loading"));
    let input = In::text("this is every low cl");
    let cold = "pt_text_3";
    let resp = s.classify(cold, &json!({"inputs": input.json()})).await;
    assert_eq!(resp.status(), 200);
    let got: Value = resp.json().await.unwrap();
    Reference::new().check(&fixture_task(cold), &input, &got[0], true);
    assert_eq!(ids(&s), ["prefix_2", cold]);
    let (status, kind, _) = error_of(s.classify("nope", &json!({"inputs": "x"})).await).await;
    assert_eq!((status, kind.as_str()), (404, "not_found"));

    // The listing ends in the background: the catalog is complete, and
    // the task loaded meanwhile stays resident.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ready: Value = s.get("/ready").await.json().await.unwrap();
        if ready["store"]["listed_tasks"] == json!(all.len()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{ready}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let list: Value = s.get("/v1/tasks").await.json().await.unwrap();
    assert_eq!(list.as_array().unwrap().len(), all.len(), "{list}");
    assert!(ids(&s).contains(&cold.to_string()));
}
