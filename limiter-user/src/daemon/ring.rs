//! The kernel's rings: its rejection reports (and what its refusal caches
//! hold) turned into events, the connections it asks to reset, and the
//! kernel programs' own log.

use crate::resets::Resetter;
use limiter_common::maps::{ConnKey, ResetRequest};

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow};
use aya::maps::{MapData, RingBuf};
use limiter_common::maps::{REPORT_INTERVAL_NS, RejectionEvent, SourceKey, gate};
use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    events::{Event, EventHub, Folder, SyslogSink},
    kernel::monotonic_ns,
};

use super::Daemon;

/// Reads the kernel's rejection reports: each goes to `limiter events`
/// followers, and, folded, to syslog.
pub(super) async fn report_events(
    ring: RingBuf<MapData>,
    daemon: Arc<Mutex<Daemon>>,
    hub: Arc<EventHub>,
    syslog: Option<crate::logging::Destination>,
    period: Duration,
) -> anyhow::Result<()> {
    // SAFETY: the ring buffer owns its map fd, which stays open and the same
    // for as long as the AsyncFd owns the ring.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow!("watching the event ring: {}", e.into_parts().1))?;
    let mut folder = Folder::new(period);
    let mut sink = syslog.map(SyslogSink::new);
    let mut ticker = tokio::time::interval(
        (period / 4).clamp(Duration::from_millis(100), Duration::from_secs(1)),
    );
    // The gates that reported lately, and their last event: what a gate
    // still holds once it goes quiet is collected and folded under that
    // event (see `ReportGate`).
    let mut gates: HashMap<(u32, SourceKey), (Instant, Event)> = HashMap::new();
    // Refusals counted by the refusal caches are claimed by one sweep and
    // reported by the next (see `limiter_common::refusals`).
    let mut swept = Instant::now();
    loop {
        let mut batch = Vec::new();
        let mut events = Vec::new();
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the event ring")?;
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if item.len() >= size_of::<RejectionEvent>() {
                        // SAFETY: the kernel wrote a RejectionEvent there;
                        // the length was checked.
                        batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<RejectionEvent>()) });
                    }
                }
                guard.clear_ready();
            }
            _ = ticker.tick() => {
                if swept.elapsed() >= REFUSAL_SWEEP_INTERVAL {
                    swept = Instant::now();
                    let mut daemon = daemon.lock().expect("daemon lock");
                    if let Err(e) = daemon.kernel.sweep_refusals(SWEEP_REPORTS_AT_MOST) {
                        log::warn!("sweeping the refusal caches: {:#}", anyhow::Error::from(e));
                    }
                }
                events = collect_quiet_gates(&daemon, &mut gates);
                // Summaries are for syslog only: followers have every
                // report already, and would count its rejections twice.
                for summary in folder.tick(Instant::now()) {
                    if let Some(sink) = sink.as_mut() {
                        sink.write(&summary);
                    }
                }
            }
        }
        if !batch.is_empty() {
            let daemon = daemon.lock().expect("daemon lock");
            for raw in &batch {
                let event = daemon.event(raw);
                // A report judged at completion went through no gate.
                if raw.gate != gate::NONE {
                    gates.insert(gate_of(raw), (Instant::now(), event.clone()));
                }
                events.push(event);
            }
        }
        for event in events {
            if let Some(first) = folder.offer(event.clone(), Instant::now())
                && let Some(sink) = sink.as_mut()
            {
                sink.write(&first);
            }
            hub.publish(event);
        }
        if let Some(sink) = &sink {
            hub.syslog_errors
                .store(sink.errors, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// How often the refusal caches are swept: a refusal they counted is
/// reported within two of these once its flood stops.
pub(super) const REFUSAL_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Reports a sweep puts on the event ring at most (it holds about 2,300):
/// what is left waits, claimed, for the next sweep.
pub(super) const SWEEP_REPORTS_AT_MOST: usize = 512;

/// The gate a report went through: its kind and the source (for a
/// connector's gate, only the connector).
pub(super) fn gate_of(raw: &RejectionEvent) -> (u32, SourceKey) {
    let addr = if raw.gate == gate::SOURCE {
        raw.source
    } else {
        [0; 16]
    };
    (
        raw.gate,
        SourceKey {
            connector: raw.connector,
            addr,
        },
    )
}

/// Collects the rejections held by gates quiet for longer than the kernel
/// holds them, as events that repeat each gate's last one.
pub(super) fn collect_quiet_gates(
    daemon: &Mutex<Daemon>,
    gates: &mut HashMap<(u32, SourceKey), (Instant, Event)>,
) -> Vec<Event> {
    // The kernel reports again after REPORT_INTERVAL_NS; a little longer,
    // and the gate is surely quiet (or has reported anew).
    let quiet = Duration::from_nanos(REPORT_INTERVAL_NS) + Duration::from_millis(100);
    let now = Instant::now();
    let mut repeats = Vec::new();
    let mut daemon = daemon.lock().expect("daemon lock");
    gates.retain(|(kind, source), (last_seen, last)| {
        if now.duration_since(*last_seen) < quiet {
            return true;
        }
        match daemon.kernel.collect_unreported(*kind, source) {
            Ok(0) => {}
            Ok(held) => {
                let mut repeat = last.clone();
                repeat.count = u64::from(held);
                repeat.time =
                    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
                repeats.push(repeat);
            }
            Err(e) => log::warn!(
                "collecting held rejection reports: {:#}",
                anyhow::Error::from(e)
            ),
        }
        false
    });
    repeats
}

/// Writes what the kernel programs tell (aya-log) to the daemon's log.
pub(super) async fn tell_kernel_log(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's fd, which stays open and
    // the same for as long as the AsyncFd owns the logger.
    let mut logger = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(logger) => logger,
        Err(e) => {
            log::error!("watching the kernel programs' log: {}", e.into_parts().1);
            return;
        }
    };
    loop {
        let mut guard = match logger.readable_mut().await {
            Ok(guard) => guard,
            Err(e) => {
                log::error!("reading the kernel programs' log stopped: {e}");
                return;
            }
        };
        // Writing a line may wait on a slow syslog collector: off the
        // runtime's workers.
        tokio::task::block_in_place(|| guard.get_inner_mut().flush());
        guard.clear_ready();
    }
}

impl Daemon {
    /// A kernel rejection report as an event line.
    pub(super) fn event(&self, raw: &RejectionEvent) -> Event {
        let name = self
            .ids
            .iter()
            .position(|id| *id == raw.connector)
            .map(|i| self.config.connectors[i].name.clone())
            .unwrap_or_else(|| format!("connector #{} (removed)", raw.connector));
        let age = Duration::from_nanos(monotonic_ns().saturating_sub(raw.time_ns));
        let time = std::time::SystemTime::now()
            .checked_sub(age)
            .unwrap_or_else(std::time::SystemTime::now);
        Event::from_kernel(raw, &name, self.config.ipv6_prefix_length, time)
    }
}

/// Resets the connections the kernel judged over a cap when their
/// handshake completed, as it asks on the `RESETS` ring.
pub(super) async fn reset_connections(
    ring: RingBuf<MapData>,
    daemon: Arc<Mutex<Daemon>>,
    resetter: Arc<Resetter>,
) -> anyhow::Result<()> {
    // SAFETY: the ring buffer owns its map fd, which stays open and the same
    // for as long as the AsyncFd owns the ring.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow!("watching the reset ring: {}", e.into_parts().1))?;
    loop {
        let mut guard = ring
            .readable_mut()
            .await
            .context("waiting on the reset ring")?;
        let mut requests = Vec::new();
        let inner = guard.get_inner_mut();
        while let Some(item) = inner.next() {
            if item.len() >= size_of::<ResetRequest>() {
                // SAFETY: the kernel wrote a ResetRequest there; the length
                // was checked.
                requests.push(unsafe {
                    std::ptr::read_unaligned(item.as_ptr().cast::<ResetRequest>())
                });
            }
        }
        guard.clear_ready();
        if requests.is_empty() {
            continue;
        }
        let (daemon, resetter) = (daemon.clone(), resetter.clone());
        tokio::task::spawn_blocking(move || {
            // The resets without the daemon's lock: the control socket and
            // the sweep go on meanwhile.
            let settled: Vec<ConnKey> = requests
                .iter()
                .filter(|request| resetter.reset(request).settled())
                .map(|request| request.conn)
                .collect();
            let mut daemon = daemon.lock().expect("daemon lock");
            for conn in &settled {
                daemon.kernel.resolve_reset(conn);
            }
        })
        .await
        .context("resetter task")?;
    }
}
