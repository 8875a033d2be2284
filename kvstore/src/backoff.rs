//! The one reconnect policy: jittered exponential backoff from 100 ms to
//! 5 s, never giving up (backon). Every loop that reconnects to etcd, to
//! the apiserver or to Kubernetes takes its delays from [`reconnect`], so
//! a flapping dependency is retried the same way everywhere.

use std::time::Duration;

use backon::ExponentialBuilder;

/// The first delay.
pub const MIN_DELAY: Duration = Duration::from_millis(100);
/// The longest delay.
pub const MAX_DELAY: Duration = Duration::from_secs(5);

/// The policy; `.build()` gives the iterator of delays of one retry run.
pub fn reconnect() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(MIN_DELAY)
        .with_max_delay(MAX_DELAY)
        .with_jitter()
        .without_max_times()
}

#[cfg(test)]
mod tests {
    use backon::BackoffBuilder as _;

    use super::*;

    #[test]
    fn delays_grow_are_bounded_and_never_end() {
        let delays: Vec<Duration> = reconnect().build().take(20).collect();
        assert_eq!(delays.len(), 20, "the policy never gives up");
        // Jitter adds up to one delay on top.
        assert!(
            delays[0] >= MIN_DELAY && delays[0] <= MIN_DELAY * 2,
            "{delays:?}"
        );
        assert!(delays.iter().all(|d| *d <= MAX_DELAY * 2), "{delays:?}");
        assert!(delays[19] >= MAX_DELAY, "{delays:?}");
    }
}
