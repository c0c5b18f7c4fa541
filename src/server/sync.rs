//! Keeps this replica's registry converged on the prompt store, which
//! replicas behind one load balancer share.
//!
//! - Every `--sync-interval-ms` a round finds what changed. A full round
//!   lists the store; a task whose version token differs from the one last
//!   acted on is downloaded and, if its content differs from what is
//!   served, validated and published; a task gone from the store stops
//!   being served. A store of [`FULL_LISTING_BELOW`] tasks or more is not
//!   listed every round: `put` and `delete` append a record to the store's
//!   change journal (`<prefix>/_changes/<ms>-<rand>-<p|d>-<id>`) before
//!   they change anything, and a journal round reads only the records after
//!   its cursor (S3: one LIST with StartAfter; minus a [`SKEW_WINDOW_MS`]
//!   window for writers whose clocks lag), reloading the resident tasks
//!   they name and removing deleted ones. A full round still runs at start,
//!   every [`FULL_LISTING_EVERY`], and after a long outage; it prunes
//!   records older than [`JOURNAL_RETENTION`]. Staleness: a change through
//!   softprompt (upload, delete, `train --output`) reaches every replica
//!   holding the task within one interval; a file copied into the store by
//!   hand, within [`FULL_LISTING_EVERY`] (one interval for small stores).
//! - A task whose new version does not load is logged once per version and
//!   counted (`softprompt_store_tasks_failing`); the last good version, if
//!   any, keeps being served. The store is the truth, but a broken upload
//!   by hand must not take a working task down.
//! - Admin writes go through [`StoreSync::put`] and [`StoreSync::delete`]:
//!   store first (durable), then the registry, under the same lock that the
//!   poller takes to apply a round, and the token the store returned is
//!   remembered, so the next poll does not reload the replica's own upload.
//!   A round that raced with an admin write leaves the written ids alone
//!   (the next round sees the store after the write).
//! - A store that cannot be reached changes nothing served: the replica
//!   keeps serving what it has, reports it in `/ready` and `/metrics`, and
//!   catches up on the first round that succeeds.
//! - Under a memory bound (`--task-memory`) the registry is a cache: a
//!   round reloads changed tasks that are resident, loads pinned ones, and
//!   loads new ones ahead of their first request only while they fit
//!   without evicting anything (at most [`PREFETCH_PER_ROUND`] a round).
//!   The rest load on their first request (`super::loader`). Without a
//!   bound every task is loaded, as before. Under a bound, start-up waits
//!   for the first listing at most `serve --listing-wait-ms` (pinned tasks
//!   are loaded first, by [`StoreSync::load_ids`]); the catalog is
//!   incomplete until that listing ends ([`StoreHealth::is_listed`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::metrics::TASKS;
use crate::registry::{LoadedTask, Registry};
use crate::store::{Change, PromptStore, StoreError};
use crate::task::Task;

/// Gauge: 1 when the last attempt to read the store succeeded, else 0.
pub const STORE_REACHABLE: &str = "softprompt_store_reachable";
/// Counter: polls (and start-up attempts) that could not read the store.
pub const STORE_SYNC_FAILURES: &str = "softprompt_store_sync_failures_total";
/// Gauge: seconds since the store was last read in full (set at scrape time).
pub const STORE_SYNC_AGE: &str = "softprompt_store_last_sync_age_seconds";
/// Gauge: tasks whose newest stored version does not load (an older
/// version, if there was one, is still served).
pub const STORE_TASKS_FAILING: &str = "softprompt_store_tasks_failing";
/// Counter: changes applied from the store, by `change` (`added`,
/// `replaced`, `removed`, `failed`).
pub const STORE_CHANGES: &str = "softprompt_store_changes_total";

/// Tasks downloaded at once in one round: enough to hide an object store's
/// latency, few enough not to flood a small machine.
const PARALLEL_LOADS: usize = 4;

/// Under a memory bound, new tasks loaded ahead of their first request in
/// one round at most, so that a round over a large store stays short.
pub const PREFETCH_PER_ROUND: usize = 256;

/// Stores with fewer tasks are listed in full every round (a LIST of up to
/// 10 pages): files dropped in by hand show within the interval.
pub const FULL_LISTING_BELOW: usize = 10_000;
/// Larger stores: a full listing at least this often (it catches writes
/// that bypassed the journal and refreshes the catalog); the journal in
/// between.
pub const FULL_LISTING_EVERY: Duration = Duration::from_secs(300);
/// Journal records with a stamp up to this much older than the newest
/// applied one are still read: a writer whose clock is behind by less than
/// this is not missed.
pub const SKEW_WINDOW_MS: u128 = 30_000;
/// Journal records older than this are pruned by full rounds; a replica
/// that could not read the store for half of it lists the store in full.
pub const JOURNAL_RETENTION: Duration = Duration::from_secs(3600);

/// What a replica knows about its store, for `/ready` and `/metrics`.
/// Exists before the store is first read, so start-up problems show too.
pub struct StoreHealth {
    location: String,
    inner: Mutex<Health>,
}

#[derive(Default)]
struct Health {
    reachable: Option<bool>,
    last_ok: Option<Instant>,
    error: Option<String>,
    failing: usize,
    /// Tasks in the store's last full listing; `None` before the first.
    listed: Option<usize>,
}

/// A copy of [`StoreHealth`] at one instant.
#[derive(Debug, Clone)]
pub struct HealthSnapshot {
    /// Where tasks are stored.
    pub location: String,
    /// Whether the last attempt to read the store succeeded; `None` before
    /// the first attempt.
    pub reachable: Option<bool>,
    /// Time since the store was last read in full.
    pub last_sync_age: Option<Duration>,
    /// Why the last attempt failed.
    pub error: Option<String>,
    /// Tasks whose newest stored version does not load.
    pub failing_tasks: usize,
    /// Tasks in the store's last full listing; `None` until the first one
    /// ends (a large store under a memory bound is listed after the
    /// replica is ready: `--listing-wait-ms`).
    pub listed_tasks: Option<usize>,
}

impl StoreHealth {
    /// Nothing known yet about the store at `location`.
    pub fn new(location: impl Into<String>) -> Self {
        StoreHealth {
            location: location.into(),
            inner: Mutex::new(Health::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Health> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current state.
    pub fn snapshot(&self) -> HealthSnapshot {
        let h = self.lock();
        HealthSnapshot {
            location: self.location.clone(),
            reachable: h.reachable,
            last_sync_age: h.last_ok.map(|t| t.elapsed()),
            error: h.error.clone(),
            failing_tasks: h.failing,
            listed_tasks: h.listed,
        }
    }

    /// True once an attempt to read the store failed and none succeeded
    /// since.
    pub fn is_unreachable(&self) -> bool {
        self.lock().reachable == Some(false)
    }

    /// Sets the age gauge; called before `/metrics` renders.
    pub fn export_age(&self) {
        if let Some(t) = self.lock().last_ok {
            metrics::gauge!(STORE_SYNC_AGE).set(t.elapsed().as_secs_f64());
        }
    }

    /// True once the store has been listed in full: the catalog that
    /// `GET /v1/tasks` pages through is complete.
    pub fn is_listed(&self) -> bool {
        self.lock().listed.is_some()
    }

    fn record_listing(&self, tasks: usize) {
        self.lock().listed = Some(tasks);
    }

    fn succeeded(&self, at: Instant, failing: usize) {
        let mut h = self.lock();
        if h.reachable == Some(false) {
            tracing::info!(store = %self.location, "store reachable again");
        }
        h.reachable = Some(true);
        h.last_ok = Some(at);
        h.error = None;
        h.failing = failing;
        metrics::gauge!(STORE_REACHABLE).set(1.0);
        metrics::gauge!(STORE_TASKS_FAILING).set(failing as f64);
    }

    fn failed(&self, error: &StoreError) {
        let mut h = self.lock();
        // Once per outage at warn; repeats at debug, so an outage does not
        // flood the log every interval.
        if h.reachable != Some(false) {
            tracing::warn!(store = %self.location, error = %error, "cannot read the prompt store; the tasks served stay as they are");
        } else {
            tracing::debug!(store = %self.location, error = %error, "store still unreachable");
        }
        h.reachable = Some(false);
        h.error = Some(error.to_string());
        metrics::gauge!(STORE_REACHABLE).set(0.0);
        metrics::counter!(STORE_SYNC_FAILURES).increment(1);
    }
}

/// Why a round did not bring the registry fully up to date.
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    /// The store could not be read (the round applied what it could).
    #[error(transparent)]
    Unavailable(StoreError),
    /// Strict mode: a task in the store does not load.
    #[error(transparent)]
    Strict(StoreError),
}

/// What one round changed.
#[derive(Debug, Default)]
pub struct RoundReport {
    /// Ids newly served.
    pub added: Vec<String>,
    /// Ids now served in a new version.
    pub replaced: Vec<String>,
    /// Ids no longer served.
    pub removed: Vec<String>,
    /// Ids whose stored version does not load, with the reason (newly
    /// found this round; known failures are not repeated).
    pub failed: Vec<(String, String)>,
}

impl RoundReport {
    /// True when the round changed nothing and found no new failure.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.replaced.is_empty()
            && self.removed.is_empty()
            && self.failed.is_empty()
    }
}

/// The store token a served (or refused) task came from.
struct Seen {
    token: String,
    failed: bool,
}

/// Book of what was last done with each id, guarded by the lock that
/// serializes admin writes and the application of rounds.
#[derive(Default)]
struct Book {
    /// Counts admin writes.
    epoch: u64,
    /// Id → the store token last acted on.
    seen: HashMap<String, Seen>,
    /// Id → epoch of its last admin write, kept until a round that listed
    /// the store after that write has applied.
    touched: HashMap<String, u64>,
}

impl Book {
    fn touch(&mut self, id: &str) {
        self.epoch += 1;
        self.touched.insert(id.to_string(), self.epoch);
    }

    fn failing(&self) -> usize {
        self.seen.values().filter(|s| s.failed).count()
    }
}

/// What loading one changed id gave.
enum Fetched {
    /// A new version, validated and placed on the device.
    Ready(Arc<LoadedTask>),
    /// Same content as served (e.g. this replica's own upload).
    Same,
    /// The stored version does not load.
    Bad(StoreError),
    /// Deleted between the listing and the download.
    Gone,
    /// The store failed while downloading it.
    Unavailable(StoreError),
}

/// Converges a registry on a store; see the module documentation.
pub struct StoreSync {
    store: Arc<dyn PromptStore>,
    registry: Arc<Registry>,
    health: Arc<StoreHealth>,
    book: tokio::sync::Mutex<Book>,
    /// The last listing of the store, sorted by id (the catalog that
    /// `GET /v1/tasks` pages through).
    catalog: Mutex<Arc<Vec<crate::store::StoreEntry>>>,
    /// Whether rounds load new tasks ahead of their first request.
    prefetch: bool,
    /// Where this replica is in the store's change journal.
    journal: tokio::sync::Mutex<JournalCursor>,
    /// Full rounds every round while the store has fewer tasks than this.
    full_below: usize,
    /// Otherwise, a full round at least this often.
    full_every: Duration,
}

/// What a replica has read of the store's change journal.
#[derive(Default)]
struct JournalCursor {
    /// Newest record stamp applied (ms since 1970).
    cursor_ms: u128,
    /// Keys applied within the skew window below the cursor (records with
    /// older stamps can still arrive late; these must not apply twice).
    seen: std::collections::BTreeSet<String>,
    last_full: Option<Instant>,
    last_ok: Option<Instant>,
    last_prune: Option<Instant>,
}

impl StoreSync {
    /// A syncer of `registry` on `store`, reporting into `health`.
    pub fn new(
        store: Arc<dyn PromptStore>,
        registry: Arc<Registry>,
        health: Arc<StoreHealth>,
    ) -> Self {
        StoreSync {
            store,
            registry,
            health,
            book: tokio::sync::Mutex::new(Book::default()),
            catalog: Mutex::new(Arc::new(Vec::new())),
            prefetch: true,
            journal: tokio::sync::Mutex::new(JournalCursor::default()),
            full_below: FULL_LISTING_BELOW,
            full_every: FULL_LISTING_EVERY,
        }
    }

    /// Full rounds every round while the store holds fewer than
    /// `full_below` tasks, else journal rounds with a full one at least
    /// every `full_every` (defaults [`FULL_LISTING_BELOW`],
    /// [`FULL_LISTING_EVERY`]).
    pub fn with_listing_policy(mut self, full_below: usize, full_every: Duration) -> Self {
        self.full_below = full_below;
        self.full_every = full_every;
        self
    }

    /// With `false`, rounds load only resident and pinned tasks; the rest
    /// load on their first request (`serve --prefetch false`).
    pub fn with_prefetch(mut self, prefetch: bool) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Whether some stored tasks may be served only once requested (a
    /// memory bound, or prefetching off): then rounds need not load every
    /// task, and start-up need not wait for the whole store.
    pub fn loads_on_demand(&self) -> bool {
        self.registry.budget().is_some() || !self.prefetch
    }

    /// The registry this syncer keeps current.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The store's tasks as last listed, sorted by id.
    pub fn catalog(&self) -> Arc<Vec<crate::store::StoreEntry>> {
        self.catalog
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The version token of `id` in the catalog, if it is there.
    pub fn catalog_token(&self, id: &str) -> Option<String> {
        let catalog = self.catalog();
        let i = catalog.binary_search_by(|e| e.id.as_str().cmp(id)).ok()?;
        Some(catalog[i].token.clone())
    }

    /// Ids whose stored version does not load (and were never loaded).
    pub async fn failing(&self) -> std::collections::HashSet<String> {
        self.book
            .lock()
            .await
            .seen
            .iter()
            .filter(|(_, s)| s.failed)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Records an admin write or delete in the catalog, so that listings
    /// show it before the next round lists the store.
    fn catalog_set(&self, id: &str, token: Option<&str>) {
        let mut c = self.catalog.lock().unwrap_or_else(|e| e.into_inner());
        let mut v = (**c).clone();
        match (v.binary_search_by(|e| e.id.as_str().cmp(id)), token) {
            (Ok(i), Some(t)) => v[i].token = t.to_string(),
            (Err(i), Some(t)) => v.insert(
                i,
                crate::store::StoreEntry {
                    id: id.to_string(),
                    token: t.to_string(),
                },
            ),
            (Ok(i), None) => {
                v.remove(i);
            }
            (Err(_), None) => return,
        }
        *c = Arc::new(v);
    }

    /// Counts admin writes so far: a load that started before a write to
    /// its id must not publish over it ([`StoreSync::publish_loaded`]).
    pub async fn epoch(&self) -> u64 {
        self.book.lock().await.epoch
    }

    /// Publishes a task loaded on its first request, unless an admin write
    /// to its id came after `epoch` (then the write's outcome stands) or a
    /// version is already resident (the poller or an upload got there
    /// first). Returns what is served now.
    pub async fn publish_loaded(
        &self,
        task: Arc<LoadedTask>,
        epoch: u64,
    ) -> Option<Arc<LoadedTask>> {
        let mut book = self.book.lock().await;
        if book.touched.get(&task.id).is_some_and(|&e| e > epoch) {
            return self.registry.get(&task.id);
        }
        if let Some(current) = self.registry.get(&task.id) {
            return Some(current);
        }
        self.registry.publish(task.clone());
        if let Some(token) = self.catalog_token(&task.id) {
            book.seen.insert(
                task.id.clone(),
                Seen {
                    token,
                    failed: false,
                },
            );
        }
        metrics::gauge!(TASKS).set(self.registry.len() as f64);
        Some(task)
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn PromptStore> {
        &self.store
    }

    /// Writes `task` durably, then serves `loaded` (its prepared form);
    /// returns the version it replaced. Nothing is published if the write
    /// fails.
    pub async fn put(
        &self,
        id: &str,
        task: &Task,
        loaded: Arc<LoadedTask>,
    ) -> Result<Option<Arc<LoadedTask>>, StoreError> {
        let mut book = self.book.lock().await;
        book.touch(id);
        let token = self.store.put(id, task).await?;
        self.catalog_set(id, Some(&token));
        let previous = self.registry.publish(loaded);
        book.seen.insert(
            id.to_string(),
            Seen {
                token,
                failed: false,
            },
        );
        metrics::gauge!(TASKS).set(self.registry.len() as f64);
        Ok(previous)
    }

    /// Deletes `id` from the store, then stops serving it; returns (was
    /// stored, was served).
    pub async fn delete(&self, id: &str) -> Result<(bool, bool), StoreError> {
        let mut book = self.book.lock().await;
        book.touch(id);
        let stored = self.store.delete(id).await?;
        self.catalog_set(id, None);
        let served = self.registry.remove(id).is_some();
        book.seen.remove(id);
        metrics::gauge!(TASKS).set(self.registry.len() as f64);
        Ok((stored, served))
    }

    /// Loads `ids` (the pinned tasks, at start-up before the first listing
    /// has ended) without listing the store. An id not in the store is
    /// logged and skipped; an unreachable store is an error.
    pub async fn load_ids(&self, ids: &[String]) -> Result<RoundReport, RoundError> {
        let started = Instant::now();
        let epoch = self.book.lock().await.epoch;
        // The token is unknown without a listing: "" until the first full
        // round records the real one (which then finds the same version).
        let wanted = ids.iter().map(|id| (id.clone(), String::new())).collect();
        let mut fetched = self
            .fetch_all(wanted, false)
            .await
            .map_err(RoundError::Strict)?;
        fetched.retain(|(id, _, f)| {
            let found = !matches!(f, Fetched::Gone);
            if !found {
                tracing::warn!(task = %id, "a pinned task is not in the store");
            }
            found
        });
        self.apply(epoch, fetched, Vec::new(), started, None).await
    }

    /// One pass: find what changed in the store, load it, apply. With
    /// `strict`, the first task that does not load fails the round before
    /// anything is applied (start-up with `--strict`).
    ///
    /// A full round lists the store; a journal round reads only the change
    /// records written since the last round (see the module documentation
    /// for when each runs).
    pub async fn round(&self, strict: bool) -> Result<RoundReport, RoundError> {
        let mut j = self.journal.lock().await;
        let floor = Change::floor(j.cursor_ms.saturating_sub(SKEW_WINDOW_MS));
        let changes = match self.store.changes_after(&floor).await {
            Ok(c) => c,
            Err(e) => {
                self.health.failed(&e);
                return Err(RoundError::Unavailable(e));
            }
        };
        let Some(changes) = changes else {
            // A store without a journal: list it every time.
            return self.full_round(strict).await;
        };
        let fresh: Vec<Change> = changes
            .into_iter()
            .filter(|c| !j.seen.contains(&c.key))
            .collect();
        let full = j.last_full.is_none_or(|t| t.elapsed() >= self.full_every)
            || j.last_ok
                .is_none_or(|t| t.elapsed() >= JOURNAL_RETENTION / 2)
            || self.catalog().len() < self.full_below;
        let result = if full {
            self.full_round(strict).await
        } else {
            self.journal_round(&fresh).await
        };
        if result.is_ok() {
            // The records are applied (or included in the listing): remember
            // them, and forget those older than the window.
            for c in &fresh {
                j.cursor_ms = j.cursor_ms.max(c.millis());
                j.seen.insert(c.key.clone());
            }
            let floor = Change::floor(j.cursor_ms.saturating_sub(SKEW_WINDOW_MS));
            j.seen = j.seen.split_off(&floor);
            j.last_ok = Some(Instant::now());
            if full {
                j.last_full = Some(Instant::now());
            }
            // Pruning lists the whole journal: not more often than a full
            // listing of a large store.
            if full
                && j.last_prune
                    .is_none_or(|t| t.elapsed() >= FULL_LISTING_EVERY)
            {
                j.last_prune = Some(Instant::now());
                let old =
                    Change::floor(Change::now_ms().saturating_sub(JOURNAL_RETENTION.as_millis()));
                if let Err(e) = self.store.prune_changes(&old).await {
                    tracing::debug!(error = %e, "pruning the store's change journal");
                }
            }
        }
        result
    }

    /// Applies the journal's records: resident and pinned tasks that
    /// changed are reloaded (or removed when deleted), new ones are loaded
    /// ahead only as a full round would; the catalog follows every record.
    async fn journal_round(&self, fresh: &[Change]) -> Result<RoundReport, RoundError> {
        let started = Instant::now();
        let epoch = self.book.lock().await.epoch;
        // The last record of each id decides.
        let mut last: HashMap<&str, &Change> = HashMap::new();
        for c in fresh {
            last.insert(c.id.as_str(), c);
        }
        let mut gone = Vec::new();
        let mut changed = Vec::new();
        for (id, c) in last {
            self.catalog_set(id, (!c.deleted).then_some(""));
            let resident = self.registry.get(id).is_some() || self.registry.is_pinned(id);
            if c.deleted {
                gone.push(id.to_string());
            } else if resident || (self.prefetch && self.registry.fits(0)) {
                // The token is unknown without a listing: "" until the next
                // full round records the real one (one more download then,
                // which finds the same version and changes nothing).
                changed.push((id.to_string(), String::new()));
            }
        }
        let mut fetched = self
            .fetch_all(changed, false)
            .await
            .map_err(RoundError::Strict)?;
        fetched.retain(|(id, _, f)| {
            let keep = !matches!(f, Fetched::Gone);
            if !keep {
                gone.push(id.clone());
            }
            keep
        });
        gone.sort();
        gone.dedup();
        self.apply(epoch, fetched, gone, started, None).await
    }

    /// A full round: list the store, load what changed, apply.
    async fn full_round(&self, strict: bool) -> Result<RoundReport, RoundError> {
        let started = Instant::now();
        let (epoch, known) = {
            let book = self.book.lock().await;
            let known: HashMap<String, String> = book
                .seen
                .iter()
                .map(|(id, s)| (id.clone(), s.token.clone()))
                .collect();
            (book.epoch, known)
        };
        // What is resident now: a task loaded on its first request while a
        // long listing runs may be missing from a page listed before it was
        // written, and must not be removed as gone.
        let resident: Vec<String> = self.registry.list().iter().map(|t| t.id.clone()).collect();
        let listing = match self.store.list().await {
            Ok(l) => l,
            Err(e) => {
                self.health.failed(&e);
                return Err(RoundError::Unavailable(e));
            }
        };
        let listed: HashSet<&str> = listing.iter().map(|e| e.id.as_str()).collect();
        let mut gone: Vec<String> = known
            .keys()
            .cloned()
            .chain(resident)
            .filter(|id| !listed.contains(id.as_str()))
            .collect();
        gone.sort();
        gone.dedup();
        // Changed tasks to load: every one without a memory bound (unless
        // prefetching is off); under one, those resident or pinned, and new
        // ones while they fit.
        let bounded = self.loads_on_demand();
        let mut prefetch = 0usize;
        let changed: Vec<(String, String)> = listing
            .iter()
            .filter(|e| known.get(&e.id) != Some(&e.token))
            .filter(|e| {
                if !bounded || self.registry.get(&e.id).is_some() || self.registry.is_pinned(&e.id)
                {
                    return true;
                }
                prefetch += 1;
                self.prefetch && prefetch <= PREFETCH_PER_ROUND && self.registry.fits(0)
            })
            .map(|e| (e.id.clone(), e.token.clone()))
            .collect();

        let fetched = match self.fetch_all(changed, strict).await {
            Ok(f) => f,
            Err(e) => return Err(RoundError::Strict(e)),
        };
        self.apply(epoch, fetched, gone, started, Some(listing))
            .await
    }

    /// Publishes what a round loaded, removes what is gone, records tokens,
    /// failures and metrics; `listing` (full rounds) becomes the catalog.
    async fn apply(
        &self,
        epoch: u64,
        fetched: Vec<(String, String, Fetched)>,
        gone: Vec<String>,
        started: Instant,
        listing: Option<Vec<crate::store::StoreEntry>>,
    ) -> Result<RoundReport, RoundError> {
        let mut report = RoundReport::default();
        let mut unavailable = None;
        let mut book = self.book.lock().await;
        // Ids written by this replica after the listing was taken: the
        // listing is older than what is served, so leave them to the next
        // round.
        let raced = |book: &Book, id: &str| book.touched.get(id).is_some_and(|&e| e > epoch);
        for (id, token, outcome) in fetched {
            if raced(&book, &id) {
                continue;
            }
            match outcome {
                Fetched::Ready(task) => {
                    let version = task.version.clone();
                    // A new task loaded ahead of its first request must not
                    // push a used one out: skip it if it does not fit.
                    let resident = self.registry.get(&id).is_some() || self.registry.is_pinned(&id);
                    if !resident && !self.registry.fits(task.bytes) {
                        continue;
                    }
                    match self.registry.publish(task) {
                        Some(old) => {
                            tracing::info!(task = %id, from = %old.version, to = %version, "task replaced from the store");
                            report.replaced.push(id.clone());
                        }
                        None => {
                            tracing::info!(task = %id, version = %version, "task added from the store");
                            report.added.push(id.clone());
                        }
                    }
                    book.seen.insert(
                        id,
                        Seen {
                            token,
                            failed: false,
                        },
                    );
                }
                Fetched::Same => {
                    book.seen.insert(
                        id,
                        Seen {
                            token,
                            failed: false,
                        },
                    );
                }
                Fetched::Bad(e) => {
                    let serving = self.registry.get(&id).map(|t| t.version.clone());
                    match &serving {
                        Some(v) => tracing::warn!(task = %id, error = %e, still_serving = %v,
                            "the stored version of a task does not load; still serving the last good version"),
                        None => {
                            tracing::warn!(task = %id, error = %e, "the stored task does not load; not serving it")
                        }
                    }
                    report.failed.push((id.clone(), e.to_string()));
                    book.seen.insert(
                        id,
                        Seen {
                            token,
                            failed: true,
                        },
                    );
                }
                Fetched::Gone => {}
                Fetched::Unavailable(e) => {
                    unavailable.get_or_insert(e);
                }
            }
        }
        for id in gone {
            if raced(&book, &id) {
                continue;
            }
            book.seen.remove(&id);
            if let Some(old) = self.registry.remove(&id) {
                tracing::info!(task = %id, version = %old.version, "task removed: gone from the store");
                report.removed.push(id);
            }
        }
        book.touched.retain(|_, e| *e > epoch);
        let failing = book.failing();
        drop(book);
        if let Some(listing) = listing {
            self.health.record_listing(listing.len());
            *self.catalog.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(listing);
        }

        metrics::gauge!(TASKS).set(self.registry.len() as f64);
        for (change, n) in [
            ("added", report.added.len()),
            ("replaced", report.replaced.len()),
            ("removed", report.removed.len()),
            ("failed", report.failed.len()),
        ] {
            if n > 0 {
                metrics::counter!(STORE_CHANGES, "change" => change).increment(n as u64);
            }
        }
        match unavailable {
            Some(e) => {
                self.health.failed(&e);
                Err(RoundError::Unavailable(e))
            }
            None => {
                self.health.succeeded(started, failing);
                Ok(report)
            }
        }
    }

    /// Downloads and prepares the changed ids, a few at a time.
    async fn fetch_all(
        &self,
        changed: Vec<(String, String)>,
        strict: bool,
    ) -> Result<Vec<(String, String, Fetched)>, StoreError> {
        let mut out = Vec::with_capacity(changed.len());
        let mut running = JoinSet::new();
        let mut pending = changed.into_iter();
        loop {
            while running.len() < PARALLEL_LOADS {
                let Some((id, token)) = pending.next() else {
                    break;
                };
                let (store, registry) = (self.store.clone(), self.registry.clone());
                running.spawn(async move {
                    let outcome = fetch(store.as_ref(), &registry, &id).await;
                    (id, token, outcome)
                });
            }
            let Some(joined) = running.join_next().await else {
                break;
            };
            let (id, token, outcome) = match joined {
                Ok(done) => done,
                // A loader panicked: a bug, not a store problem; surface it.
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => unreachable!("loaders are never cancelled while awaited: {e}"),
            };
            if strict && let Fetched::Bad(e) = outcome {
                running.abort_all();
                return Err(e);
            }
            out.push((id, token, outcome));
        }
        Ok(out)
    }

    /// Polls the store every `interval` until `stop` resolves.
    pub async fn run(
        self: Arc<Self>,
        interval: Duration,
        faults: crate::faults::Faults,
        stop: impl Future<Output = ()>,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; start-up just loaded
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = &mut stop => return,
            }
            match self.round(false).await {
                Ok(r) if !r.is_empty() => tracing::info!(
                    added = r.added.len(),
                    replaced = r.replaced.len(),
                    removed = r.removed.len(),
                    failed = r.failed.len(),
                    tasks = self.registry.len(),
                    "synced with the store"
                ),
                Ok(_) => {}
                // Logged (once per outage) by StoreHealth.
                Err(RoundError::Unavailable(_)) => {}
                Err(RoundError::Strict(e)) => tracing::warn!(error = %e, "store sync"),
            }
            if faults.poller_panic {
                panic!("injected fault: poller-panic");
            }
        }
    }
}

/// Downloads one task and prepares it unless it is the version served.
async fn fetch(store: &dyn PromptStore, registry: &Arc<Registry>, id: &str) -> Fetched {
    let task = match store.load(id).await {
        Ok(t) => t,
        Err(StoreError::NotFound(_)) => return Fetched::Gone,
        Err(e) if e.is_unavailable() => return Fetched::Unavailable(e),
        Err(e) => return Fetched::Bad(e),
    };
    if registry.get(id).is_some_and(|t| t.version == task.version) {
        return Fetched::Same;
    }
    // Validation and device placement are CPU work: off the async workers.
    let (registry, id) = (registry.clone(), id.to_string());
    match tokio::task::spawn_blocking(move || registry.prepare(&id, &task)).await {
        Ok(Ok(loaded)) => Fetched::Ready(loaded),
        Ok(Err(e)) => Fetched::Bad(StoreError::Registry(e)),
        Err(e) => Fetched::Unavailable(StoreError::Io {
            location: "task loader".into(),
            source: std::io::Error::other(e.to_string()),
        }),
    }
}
