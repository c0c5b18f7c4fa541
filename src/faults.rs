//! Fault injection for tests of supervision and shutdown: a hidden
//! `serve --faults` flag (env `SOFTPROMPT_FAULTS`), empty by default, that
//! makes the inference thread or the store poller die, or batches slow, at
//! will. Tests run the real binary, which cannot be built with a test-only
//! feature from `cargo test`, so the hooks ship, off, in every build; each
//! costs one branch on a cold path.

use std::str::FromStr;
use std::time::Duration;

use crate::store::{Change, PromptStore, StoreEntry, StoreError};
use crate::task::Task;

/// Faults to inject (all off by default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// The inference thread panics, outside the per-batch guard, before
    /// the batch after this many batches.
    pub worker_panic_after: Option<u64>,
    /// The store poller panics after its first round.
    pub poller_panic: bool,
    /// Every batch takes at least this long (a saturated engine).
    pub batch_delay: Option<Duration>,
    /// Every forward pass fails (as an engine error would).
    pub batch_fail: bool,
    /// Every full listing of the store takes at least this long (a store of
    /// a million objects on S3).
    pub store_list_delay: Option<Duration>,
}

impl FromStr for Faults {
    type Err = String;

    /// Comma-separated: `worker-panic-after=N`, `poller-panic`,
    /// `batch-delay-ms=N`, `batch-fail`, `store-list-delay-ms=N`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut f = Faults::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("fault {key:?} needs a number, got {value:?}"))
            };
            match key {
                "worker-panic-after" => f.worker_panic_after = Some(number()?),
                "poller-panic" => f.poller_panic = true,
                "batch-fail" => f.batch_fail = true,
                "batch-delay-ms" => f.batch_delay = Some(Duration::from_millis(number()?)),
                "store-list-delay-ms" => {
                    f.store_list_delay = Some(Duration::from_millis(number()?))
                }
                _ => return Err(format!("unknown fault {key:?}")),
            }
        }
        Ok(f)
    }
}

/// A store whose full listings take at least `delay` (fault
/// `store-list-delay-ms`): how a replica starts in front of a store too
/// large to list within `--listing-wait-ms` is tested with it.
pub struct SlowListing {
    /// The store wrapped.
    pub inner: std::sync::Arc<dyn PromptStore>,
    /// Added to every `list`.
    pub delay: Duration,
}

#[async_trait::async_trait]
impl PromptStore for SlowListing {
    async fn list(&self) -> Result<Vec<StoreEntry>, StoreError> {
        tokio::time::sleep(self.delay).await;
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
    async fn changes_after(&self, after: &str) -> Result<Option<Vec<Change>>, StoreError> {
        self.inner.changes_after(after).await
    }
    async fn prune_changes(&self, before: &str) -> Result<(), StoreError> {
        self.inner.prune_changes(before).await
    }
    fn location(&self) -> String {
        self.inner.location()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_unknown_faults() {
        assert_eq!("".parse::<Faults>().unwrap(), Faults::default());
        let f: Faults =
            "worker-panic-after=3, poller-panic,batch-delay-ms=20,store-list-delay-ms=7"
                .parse()
                .unwrap();
        assert_eq!(f.store_list_delay, Some(Duration::from_millis(7)));
        assert_eq!(f.worker_panic_after, Some(3));
        assert!(f.poller_panic);
        assert_eq!(f.batch_delay, Some(Duration::from_millis(20)));
        assert!("explode".parse::<Faults>().is_err());
        assert!("batch-delay-ms=x".parse::<Faults>().is_err());
    }
}
