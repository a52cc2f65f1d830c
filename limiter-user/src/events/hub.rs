//! The recent events, and the followers of `limiter events --follow`.

use std::{
    collections::VecDeque,
    sync::{Mutex, atomic::AtomicU64},
};

use tokio::sync::broadcast;

use super::*;

/// Events kept for `limiter events` without `--follow`.
pub(super) const RECENT: usize = 1000;

/// Events a follower may fall behind by before it loses some.
pub(super) const FOLLOWER_BACKLOG: usize = 4096;

/// The events for `limiter events`: the recent ones, and a stream for
/// followers that never waits for them.
pub struct EventHub {
    recent: Mutex<VecDeque<Event>>,
    stream: broadcast::Sender<Event>,
    /// Event lines syslog did not take (for the metrics).
    pub syslog_errors: AtomicU64,
}

impl Default for EventHub {
    fn default() -> Self {
        EventHub {
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            stream: broadcast::channel(FOLLOWER_BACKLOG).0,
            syslog_errors: AtomicU64::new(0),
        }
    }
}

impl EventHub {
    pub fn publish(&self, event: Event) {
        {
            let mut recent = self.recent.lock().expect("events lock");
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(event.clone());
        }
        // No follower is not an error.
        let _ = self.stream.send(event);
    }

    /// The recent events, oldest first.
    pub fn recent(&self) -> Vec<Event> {
        self.recent
            .lock()
            .expect("events lock")
            .iter()
            .cloned()
            .collect()
    }

    /// A live stream from now on; a receiver that falls behind by more than
    /// the backlog is told how many it lost.
    pub fn follow(&self) -> broadcast::Receiver<Event> {
        self.stream.subscribe()
    }
}
