//! Which tasks stay resident under a byte budget: the least recently used
//! unpinned task leaves first. A pure bookkeeping structure (no tensors, no
//! locks), so that the policy is tested on its own; [`super::Registry`]
//! holds it under a mutex next to the task map.

use std::collections::{BTreeMap, HashMap, HashSet};

/// Recency and bytes of the resident tasks.
#[derive(Debug)]
pub struct Residency {
    /// Most bytes of resident task tensors; `None`: no bound.
    budget: Option<u64>,
    /// Ids never evicted.
    pins: HashSet<String>,
    /// Logical clock: every touch takes the next value.
    tick: u64,
    /// Tick of last use → id, oldest first.
    order: BTreeMap<u64, String>,
    /// Id → (tick of last use, bytes).
    at: HashMap<String, (u64, u64)>,
    /// Sum of the resident tasks' bytes.
    bytes: u64,
}

impl Residency {
    /// An empty set bounded by `budget` bytes (`None`: unbounded), never
    /// evicting `pins`.
    pub fn new(budget: Option<u64>, pins: impl IntoIterator<Item = String>) -> Self {
        Residency {
            budget,
            pins: pins.into_iter().collect(),
            tick: 0,
            order: BTreeMap::new(),
            at: HashMap::new(),
            bytes: 0,
        }
    }

    /// Marks `id` as just used; false when it is not resident.
    pub fn touch(&mut self, id: &str) -> bool {
        let Some((tick, _)) = self.at.get_mut(id) else {
            return false;
        };
        self.tick += 1;
        let old = std::mem::replace(tick, self.tick);
        let name = self.order.remove(&old).expect("order and at agree");
        self.order.insert(self.tick, name);
        true
    }

    /// Makes `id` resident with `bytes` (replacing what it had) as the most
    /// recently used, then evicts the least recently used unpinned tasks
    /// other than `id` until the set fits its budget (or nothing else can
    /// go: pins and `id` itself stay even over it). Returns the evicted ids.
    pub fn insert(&mut self, id: &str, bytes: u64) -> Vec<String> {
        self.tick += 1;
        match self.at.get_mut(id) {
            Some((tick, b)) => {
                self.order.remove(tick);
                self.bytes = self.bytes - *b + bytes;
                *tick = self.tick;
                *b = bytes;
            }
            None => {
                self.at.insert(id.to_string(), (self.tick, bytes));
                self.bytes += bytes;
            }
        }
        self.order.insert(self.tick, id.to_string());
        let mut evicted = Vec::new();
        let Some(budget) = self.budget else {
            return evicted;
        };
        while self.bytes > budget {
            let victim = self
                .order
                .values()
                .find(|v| v.as_str() != id && !self.pins.contains(v.as_str()))
                .cloned();
            let Some(v) = victim else { break };
            self.remove(&v);
            evicted.push(v);
        }
        evicted
    }

    /// Forgets `id`; false when it was not resident.
    pub fn remove(&mut self, id: &str) -> bool {
        match self.at.remove(id) {
            Some((tick, b)) => {
                self.order.remove(&tick);
                self.bytes -= b;
                true
            }
            None => false,
        }
    }

    /// Bytes of the resident tasks.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Resident tasks.
    pub fn len(&self) -> usize {
        self.at.len()
    }

    /// True when nothing is resident.
    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    /// The byte bound, if any.
    pub fn budget(&self) -> Option<u64> {
        self.budget
    }

    /// Whether `bytes` more fit without evicting anything: what loading a
    /// task ahead of its first request (the store poller's prefetch) needs.
    pub fn fits(&self, bytes: u64) -> bool {
        self.budget.is_none_or(|b| self.bytes + bytes <= b)
    }

    /// Whether `id` is pinned.
    pub fn is_pinned(&self, id: &str) -> bool {
        self.pins.contains(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn least_recently_used_unpinned_tasks_leave_first() {
        let mut r = Residency::new(Some(300), ids(&["p"]));
        assert!(r.insert("p", 100).is_empty());
        assert!(r.insert("a", 100).is_empty());
        assert!(r.insert("b", 100).is_empty());
        assert_eq!(r.bytes(), 300);
        // a is used, so b is now the oldest unpinned; p is older but pinned.
        assert!(r.touch("a"));
        assert_eq!(r.insert("c", 100), ids(&["b"]));
        assert_eq!(r.insert("d", 150), ids(&["a", "c"]));
        assert_eq!((r.len(), r.bytes()), (2, 250));
        assert!(!r.touch("b"), "evicted tasks are not resident");
    }

    #[test]
    fn a_task_larger_than_the_budget_stays_alone_with_the_pins() {
        let mut r = Residency::new(Some(100), ids(&["p"]));
        r.insert("p", 60);
        r.insert("a", 30);
        assert_eq!(r.insert("big", 500), ids(&["a"]));
        assert_eq!((r.len(), r.bytes()), (2, 560));
        // The next insert evicts it first: it is the least recently used.
        assert_eq!(r.insert("b", 10), ids(&["big"]));
        assert_eq!(r.bytes(), 70);
    }

    #[test]
    fn replacing_a_task_updates_its_bytes_and_recency() {
        let mut r = Residency::new(Some(200), Vec::new());
        r.insert("a", 100);
        r.insert("b", 100);
        assert!(r.insert("a", 50).is_empty());
        assert_eq!(r.bytes(), 150);
        assert_eq!(r.insert("c", 100), ids(&["b"]));
        assert!(r.remove("a"));
        assert!(!r.remove("a"));
        assert_eq!((r.len(), r.bytes()), (1, 100));
        assert!(r.fits(100) && !r.fits(101));
    }

    #[test]
    fn without_a_budget_nothing_is_evicted() {
        let mut r = Residency::new(None, Vec::new());
        for i in 0..100 {
            assert!(r.insert(&format!("t{i}"), 1 << 30).is_empty());
        }
        assert_eq!(r.len(), 100);
        assert!(r.fits(u64::MAX / 2));
    }
}
