//! Timeouts that cost nothing when the I/O is ready at once.

use std::future::Future;
use std::task::Poll;
use std::time::Duration;

/// Runs `io` with at most `limit` to finish; `None` when the time ran out.
///
/// The timer (a clock read, and a timer-wheel entry to add and remove) is set up
/// only when `io` does not finish on its first poll. Under load that spares most
/// writes and the reads of data that has already arrived.
pub async fn within<F: Future>(limit: Duration, io: F) -> Option<F::Output> {
    let mut io = std::pin::pin!(io);
    if let Poll::Ready(out) = std::future::poll_fn(|cx| Poll::Ready(io.as_mut().poll(cx))).await {
        return Some(out);
    }
    tokio::time::timeout(limit, io).await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_work_needs_no_timer_and_pending_work_times_out() {
        assert_eq!(within(Duration::ZERO, async { 7 }).await, Some(7));
        let slow = tokio::time::sleep(Duration::from_secs(5));
        assert_eq!(within(Duration::from_millis(10), slow).await, None);
        let in_time = async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            8
        };
        assert_eq!(within(Duration::from_secs(5), in_time).await, Some(8));
    }
}
