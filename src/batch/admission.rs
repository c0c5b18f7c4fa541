//! Admission in tokens, before any work: a request reserves an upper bound
//! of the positions its rows will occupy *before* it is tokenized, keeps
//! them while it is tokenized, queued and computed, and gives back the
//! excess once the exact count is known. A full server therefore answers
//! 429 at the cost of parsing the JSON, not of tokenizing it, and the work
//! waiting is bounded in tokens (what compute time scales with), not in
//! rows, so long inputs cannot pile up into timeouts.
//!
//! tower's `ConcurrencyLimit` + `LoadShed` would bound requests, not the
//! tokens they carry (one request may hold 64 inputs of 512 tokens), and
//! could not give back the unused part of a reservation; a semaphore of
//! tokens does both.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

use super::BatchError;
use super::metrics as m;

/// The token budget of everything admitted and not yet answered.
pub(crate) struct Admission {
    tokens: Arc<Semaphore>,
    capacity: usize,
}

/// Tokens held by one request; given back when dropped.
pub struct Ticket {
    permit: OwnedSemaphorePermit,
}

impl Ticket {
    /// Tokens held.
    pub fn tokens(&self) -> usize {
        self.permit.num_permits()
    }

    /// Gives back what is held beyond `tokens` (the exact count, known
    /// after tokenization, is never above the reserved upper bound).
    pub fn shrink_to(&mut self, tokens: usize) {
        let excess = self.permit.num_permits().saturating_sub(tokens);
        if excess > 0 {
            drop(self.permit.split(excess));
            metrics::gauge!(m::ADMITTED_TOKENS).decrement(excess as f64);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        metrics::gauge!(m::ADMITTED_TOKENS).decrement(self.permit.num_permits() as f64);
    }
}

impl Admission {
    pub fn new(capacity: usize) -> Self {
        // Permits are taken as u32 at a time; a larger bound means no bound.
        let capacity = capacity.min(u32::MAX as usize);
        Admission {
            tokens: Arc::new(Semaphore::new(capacity)),
            capacity,
        }
    }

    /// Reserves `tokens` now or refuses at once: never waits.
    pub fn try_admit(&self, tokens: usize) -> Result<Ticket, BatchError> {
        if tokens > self.capacity {
            return Err(BatchError::TooLarge {
                requested: tokens,
                capacity: self.capacity,
            });
        }
        // Fits in u32: capacity does (see `new`).
        match self.tokens.clone().try_acquire_many_owned(tokens as u32) {
            Ok(permit) => {
                metrics::gauge!(m::ADMITTED_TOKENS).increment(tokens as f64);
                Ok(Ticket { permit })
            }
            Err(TryAcquireError::NoPermits) => Err(BatchError::QueueFull {
                admitted: self.capacity - self.tokens.available_permits(),
                requested: tokens,
                capacity: self.capacity,
            }),
            Err(TryAcquireError::Closed) => Err(BatchError::Closed),
        }
    }

    /// Tokens admitted and not yet answered.
    pub fn admitted(&self) -> usize {
        self.capacity - self.tokens.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_capacity_and_shrinking_frees_the_excess() {
        let a = Admission::new(100);
        let mut t1 = a.try_admit(60).unwrap();
        assert!(matches!(
            a.try_admit(50),
            Err(BatchError::QueueFull {
                admitted: 60,
                requested: 50,
                capacity: 100
            })
        ));
        t1.shrink_to(20);
        assert_eq!(t1.tokens(), 20);
        let t2 = a.try_admit(80).unwrap();
        assert_eq!(a.admitted(), 100);
        drop(t1);
        drop(t2);
        assert_eq!(a.admitted(), 0);
        assert!(matches!(
            a.try_admit(101),
            Err(BatchError::TooLarge {
                requested: 101,
                capacity: 100
            })
        ));
    }
}
