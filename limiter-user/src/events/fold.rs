//! Folding repeats like Exchange's periodic logging: the first rejection
//! of a (connector, source, rule) at once, the others as one summary a
//! period.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use super::*;

/// What makes two rejections "the same" for folding: connector, source,
/// rule, and whether they were late.
pub(super) type FoldKey = (String, String, String, bool);

pub(super) struct Window {
    started: Instant,
    /// Rejections since the last line written for this key.
    suppressed: u64,
    last: Event,
}

/// Exchange's periodic logging: the first rejection of a (connector,
/// source, rule) is written at once; the ones after it are counted and
/// written as one summary per period; a key quiet for a whole period starts
/// over.
pub struct Folder {
    period: Duration,
    windows: HashMap<FoldKey, Window>,
}

impl Folder {
    pub fn new(period: Duration) -> Folder {
        Folder {
            period,
            windows: HashMap::new(),
        }
    }

    /// Takes a rejection; returns it if it is to be written now.
    pub fn offer(&mut self, event: Event, now: Instant) -> Option<Event> {
        let key = (
            event.connector.clone(),
            event.source.clone(),
            event.rule.clone(),
            event.late,
        );
        match self.windows.get_mut(&key) {
            Some(window) => {
                window.suppressed += event.count;
                window.last = event;
                None
            }
            // Repeats of a rejection written before: into a summary.
            None if event.repeat => {
                self.windows.insert(
                    key,
                    Window {
                        started: now,
                        suppressed: event.count,
                        last: event,
                    },
                );
                None
            }
            None => {
                self.windows.insert(
                    key,
                    Window {
                        started: now,
                        suppressed: 0,
                        last: event.clone(),
                    },
                );
                Some(event)
            }
        }
    }

    /// The summaries of the periods that ended by `now`.
    pub fn tick(&mut self, now: Instant) -> Vec<Event> {
        let mut out = Vec::new();
        let period = self.period;
        self.windows.retain(|_, window| {
            if now.duration_since(window.started) < period {
                return true;
            }
            if window.suppressed == 0 {
                return false;
            }
            let mut summary = window.last.clone();
            summary.count = window.suppressed;
            summary.summary = true;
            summary.period_seconds = Some(period.as_secs().max(1));
            out.push(summary);
            window.suppressed = 0;
            window.started = now;
            true
        });
        out.sort_by(|a, b| a.time.cmp(&b.time));
        out
    }
}
