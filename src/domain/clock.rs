//! The daemon's notion of "now": real time plus an offset that tests move forward, so that a
//! month can turn in a test without waiting a month.

use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Utc};

#[derive(Debug, Default)]
pub struct Clock {
    offset_ms: AtomicI64,
}

impl Clock {
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + chrono::Duration::milliseconds(self.offset_ms.load(Ordering::Relaxed))
    }

    /// Moves this clock so that it reads `to` now (forward or back).
    pub fn set(&self, to: DateTime<Utc>) {
        let offset = (to - Utc::now()).num_milliseconds();
        self.offset_ms.store(offset, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_clock_reads_the_set_time_and_keeps_running() {
        let clock = Clock::default();
        let target = "2027-01-31T23:59:59Z".parse::<DateTime<Utc>>().unwrap();
        clock.set(target);
        let read = clock.now();
        assert!((read - target).num_milliseconds().abs() < 50, "{read}");
    }
}
