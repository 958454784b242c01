//! Decode admission: one budget of decoded-image bytes shared by every request.
//!
//! The inference queue bounds model runs only; decoding happens before it, and a small
//! compressed upload may decode to tens of megabytes. Without a shared bound, memory grows
//! with the number of concurrent requests. Each image reserves its decoded size (read from
//! its header) before its pixels are decoded and gives it back once its face crop exists;
//! when the budget is spent, it waits up to `--decode-wait-ms`, then the request is
//! answered 503 `decode_busy` with Retry-After.
//!
//! Decoding runs on blocking threads, so the wait is a plain condition variable.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use prometheus::IntGauge;

use crate::error::{ApiError, ErrorKind};

/// Bytes reserved per decoded byte: the decoder's buffer plus the RGB copy (or the rotated
/// copy, or the crop's source) that exists next to it at the peak.
pub const RESERVE_FACTOR: u64 = 2;

pub struct DecodeBudget {
    total: u64,
    wait: Duration,
    used: Mutex<u64>,
    freed: Condvar,
    gauge: Option<IntGauge>,
}

/// Bytes held by one image until dropped.
#[must_use]
pub struct Reservation<'a> {
    budget: &'a DecodeBudget,
    bytes: u64,
}

impl DecodeBudget {
    pub fn new(total: u64, wait: Duration) -> DecodeBudget {
        DecodeBudget {
            total: total.max(1),
            wait,
            used: Mutex::new(0),
            freed: Condvar::new(),
            gauge: None,
        }
    }

    /// Reports the bytes reserved at any moment in `gauge`.
    pub fn with_gauge(mut self, gauge: IntGauge) -> DecodeBudget {
        self.gauge = Some(gauge);
        self
    }

    /// Reserves room for an image that decodes to `decoded_bytes`, waiting for other images
    /// to finish if needed. An image larger than the whole budget waits for an empty budget
    /// and then decodes alone, so it is bounded by the budget as far as it can be (the
    /// per-image `--max-decoded-bytes` limit refuses truly large ones before this).
    pub fn reserve(&self, decoded_bytes: u64) -> Result<Reservation<'_>, ApiError> {
        let bytes = decoded_bytes.saturating_mul(RESERVE_FACTOR).min(self.total);
        let deadline = Instant::now() + self.wait;
        // A poisoned lock means a panic elsewhere mid-update of a plain counter; it is still valid.
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used + bytes > self.total {
            let now = Instant::now();
            if now >= deadline {
                return Err(ApiError::new(
                    ErrorKind::DecodeBusy,
                    format!(
                        "too many images are being decoded at once (budget {} bytes); retry shortly",
                        self.total
                    ),
                ));
            }
            used = self
                .freed
                .wait_timeout(used, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *used += bytes;
        self.report(*used);
        Ok(Reservation {
            budget: self,
            bytes,
        })
    }

    pub fn used(&self) -> u64 {
        *self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn report(&self, used: u64) {
        if let Some(g) = &self.gauge {
            g.set(i64::try_from(used).unwrap_or(i64::MAX));
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().unwrap_or_else(|e| e.into_inner());
        *used = used.saturating_sub(self.bytes);
        self.budget.report(*used);
        drop(used);
        self.budget.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn reservations_wait_for_room_and_give_it_back() {
        let budget = Arc::new(DecodeBudget::new(100, Duration::from_secs(5)));
        let a = budget.reserve(30).unwrap(); // 60 reserved
        assert_eq!(budget.used(), 60);
        let waiter = {
            let budget = budget.clone();
            std::thread::spawn(move || budget.reserve(30).map(|r| r.bytes).map_err(|e| e.kind))
        };
        // The second reservation can only succeed once the first is returned.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(budget.used(), 60);
        drop(a);
        assert_eq!(waiter.join().unwrap(), Ok(60));
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn exhausted_budget_answers_decode_busy_after_the_wait() {
        let budget = DecodeBudget::new(100, Duration::from_millis(20));
        let _held = budget.reserve(50).unwrap();
        let err = budget.reserve(1).err().expect("no room");
        assert_eq!(err.kind, ErrorKind::DecodeBusy);
        // Larger than the whole budget: clamped, so it runs once the budget is empty.
        drop(_held);
        let big = budget.reserve(1_000).unwrap();
        assert_eq!(budget.used(), 100);
        drop(big);
        assert_eq!(budget.used(), 0);
    }
}
