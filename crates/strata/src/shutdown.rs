//! The signal that stops a cache's background tasks.

use tokio::sync::watch;

/// Sends the stop signal; dropping it stops the tasks too.
pub(crate) struct StopSender(watch::Sender<bool>);

/// Received by every background task.
#[derive(Clone)]
pub(crate) struct Stop(watch::Receiver<bool>);

/// A connected sender and receiver.
pub(crate) fn channel() -> (StopSender, Stop) {
    let (tx, rx) = watch::channel(false);
    (StopSender(tx), Stop(rx))
}

impl StopSender {
    pub(crate) fn stop(&self) {
        // The receivers may all be gone already; nothing to do then.
        let _ = self.0.send(true);
    }
}

impl Drop for StopSender {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Stop {
    /// Resolves once the stop signal was sent (or its sender is gone).
    pub(crate) async fn stopped(&mut self) {
        // Err: every sender is gone, which also means stop.
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}
