//! Reading the kernel's counts and queues, and the control program's
//! operations on them (seed, release, forget, sweep).

use std::collections::HashSet;

use aya::programs::{TestRun, TestRunOptions, Xdp};
use limiter_common::maps::{
    ConnKey, ConnectorConfig, Control, Endpoint, FlowKey, FlowValue, ResetRequest, SourceCount,
    SourceKey, control, gate, names, programs, stat,
};
use limiter_common::refusals::{
    self, CachedRefusal, REFUSAL_SETS_USED_WORDS, REFUSAL_SLOTS, REFUSAL_WAYS,
};

use super::attach::program_ref;
use super::{Kernel, KernelError, Stats, map_err, prog_err};

/// A `Control` request about `source`.
pub(super) fn source_request(op: u32, source: &SourceKey, idle_ns: u64) -> Control {
    Control {
        op,
        result: 0,
        flow: FlowKey {
            local: [0; 16],
            remote: [0; 16],
            local_port: 0,
            remote_port: 0,
        },
        source: *source,
        idle_ns,
        cpu: 0,
        first_slot: 0,
    }
}

impl Kernel {
    /// The reset requests waiting in the ring (those a daemon that is gone
    /// never saw), taken; their entries in `PENDING_RESETS` stay until the
    /// resets are done.
    pub fn ringed_resets(&mut self) -> Vec<ResetRequest> {
        let mut requests = Vec::new();
        if let Some(ring) = self.resets.as_mut() {
            while let Some(item) = ring.next() {
                if item.len() >= size_of::<ResetRequest>() {
                    // SAFETY: the kernel wrote a ResetRequest there; the
                    // length was checked.
                    requests.push(unsafe {
                        std::ptr::read_unaligned(item.as_ptr().cast::<ResetRequest>())
                    });
                }
            }
        }
        requests
    }

    /// Every reset requested and not yet done.
    pub fn pending_resets(&self) -> Vec<ResetRequest> {
        self.pending_resets
            .iter()
            .filter_map(Result::ok)
            .map(|(_, request)| request)
            .collect()
    }

    /// A reset is done (or its socket is gone): forget the request.
    pub fn resolve_reset(&mut self, conn: &ConnKey) {
        let _ = self.pending_resets.remove(conn);
    }

    /// Server endpoints that SYNs to a bound port were seen to end up at,
    /// undeclared, with the connector id they were addressed to.
    pub fn undeclared_forwards(&self) -> Vec<(Endpoint, u32)> {
        self.undeclared_forwards
            .iter()
            .filter_map(Result::ok)
            .collect()
    }

    /// Sweeps every CPU's refusal cache once (see
    /// `limiter_common::refusals::GATE_CLAIMED`): refusals a cache holds
    /// that no report carries are claimed, and those claimed a sweep ago
    /// are reported, in at most `max_reports` reports (the rest wait for the
    /// next sweep, so that a sweep never fills the event ring alone).
    /// Returns how many refusals it reported.
    pub fn sweep_refusals(&mut self, max_reports: usize) -> Result<u64, KernelError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| KernelError::Cpus(e))? as u32;
        let (mut reported, mut reports) = (0u64, 0usize);
        for cpu in 0..cpus {
            let mut first_slot = 0;
            while first_slot < REFUSAL_SLOTS && reports < max_reports {
                let mut request = source_request(
                    control::SWEEP_REFUSALS,
                    &SourceKey {
                        connector: 0,
                        addr: [0; 16],
                    },
                    0,
                );
                request.cpu = cpu;
                request.first_slot = first_slot;
                let answer = self.run_control_answer(request)?;
                if answer.result > 0 {
                    reported += u64::from(answer.result);
                    reports += 1;
                }
                // The kernel always moves on; a stuck answer must not hang.
                first_slot = answer.first_slot.max(first_slot + 1);
            }
        }
        Ok(reported)
    }

    /// Every CPU's cached refusals: (CPU, slot, entry), the empty slots left
    /// out.
    pub fn cached_refusals(&self) -> Vec<(usize, u32, CachedRefusal)> {
        let mut out = Vec::new();
        for slot in 0..REFUSAL_SLOTS {
            let Ok(values) = self.refusals.get(&slot, 0) else {
                continue;
            };
            for (cpu, entry) in values.iter().enumerate() {
                if entry.connector != 0 {
                    out.push((cpu, slot, *entry));
                }
            }
        }
        out
    }

    /// The refusal cache's sets each CPU marks as holding a refusal that may
    /// still stand: (CPU, the set's first slot).
    pub fn refusal_sets_used(&self) -> Result<Vec<(usize, u32)>, KernelError> {
        let name = names::REFUSAL_SETS_USED;
        let words = (0..REFUSAL_SETS_USED_WORDS)
            .map(|word| self.refusal_sets_used.get(&word, 0).map_err(map_err(name)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::new();
        for first in (0..REFUSAL_SLOTS).step_by(REFUSAL_WAYS as usize) {
            let (word, bit) = refusals::set_used_bit(first);
            for (cpu, bits) in words[word as usize].iter().enumerate() {
                if bits & bit != 0 {
                    out.push((cpu, first));
                }
            }
        }
        Ok(out)
    }

    /// Runs one control request for `flow` in the kernel and returns its
    /// code (`limiter_common::maps::control::DONE`, ...).
    pub fn control(&mut self, op: u32, flow: &FlowKey) -> Result<u32, KernelError> {
        self.run_control(Control {
            op,
            result: 0,
            flow: *flow,
            source: SourceKey {
                connector: 0,
                addr: [0; 16],
            },
            idle_ns: 0,
            cpu: 0,
            first_slot: 0,
        })
    }

    /// Takes the rejections that a report gate holds (see
    /// `limiter_common::maps::ReportGate`): the gate of `source`, or with
    /// `gate::CONNECTOR` the gate of its connector. Returns how many.
    pub fn collect_unreported(
        &mut self,
        kind: u32,
        source: &SourceKey,
    ) -> Result<u32, KernelError> {
        let op = if kind == gate::CONNECTOR {
            control::COLLECT_CONNECTOR
        } else {
            control::COLLECT_SOURCE
        };
        self.run_control(source_request(op, source, 0))
    }

    /// Deletes `source`'s entry if it holds nothing and has held nothing
    /// for `idle`, checked in the kernel at the moment of the deletion.
    pub fn forget_source(
        &mut self,
        source: &SourceKey,
        idle: std::time::Duration,
        under_pressure: bool,
    ) -> Result<bool, KernelError> {
        let op = if under_pressure {
            control::FORGET_SOURCE_UNDER_PRESSURE
        } else {
            control::FORGET_SOURCE
        };
        let request = source_request(op, source, idle.as_nanos() as u64);
        Ok(self.run_control(request)? == control::DONE)
    }

    pub(super) fn run_control(&mut self, request: Control) -> Result<u32, KernelError> {
        Ok(self.run_control_answer(request)?.result)
    }

    pub(super) fn run_control_answer(&mut self, request: Control) -> Result<Control, KernelError> {
        // SAFETY: `Control` is `#[repr(C)]` plain data with no implicit
        // padding (checked in limiter-common's tests).
        let bytes: [u8; size_of::<Control>()] = unsafe { std::mem::transmute(request) };
        let mut out = [0u8; size_of::<Control>()];
        let program: &Xdp = program_ref(&self.ebpf, programs::CONTROL)?;
        program
            .test_run(TestRunOptions {
                data_in: Some(&bytes),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .map_err(prog_err(programs::CONTROL))?;
        // SAFETY: the program's frame is a `Control`, written back whole.
        Ok(unsafe { std::mem::transmute::<[u8; size_of::<Control>()], Control>(out) })
    }

    /// Live connections of the connector with id `id`.
    pub fn connector_live(&self, id: u32) -> Result<u32, KernelError> {
        self.connector_state
            .get(&id, 0)
            .map(|state| state.live)
            .map_err(map_err(names::CONNECTOR_STATE))
    }

    /// Live connections on every connector id.
    pub fn live_total(&self) -> Result<u64, KernelError> {
        self.connector_state
            .iter()
            .map(|state| {
                state
                    .map(|s| u64::from(s.live))
                    .map_err(map_err(names::CONNECTOR_STATE))
            })
            .sum()
    }

    /// Every source entry (live or idle).
    pub fn sources(&self) -> Vec<(SourceKey, SourceCount)> {
        self.source_live.iter().filter_map(Result::ok).collect()
    }

    /// Entries in the source table.
    pub fn sources_len(&self) -> usize {
        self.source_live.keys().count()
    }

    /// Live connections of one source (0 when it has no entry).
    pub fn source_live(&self, key: &SourceKey) -> u32 {
        self.source_count(key).map_or(0, |count| count.live)
    }

    /// One source's entry: its live connections and its rate window
    /// (`None` when it has no entry: it holds nothing, opened nothing
    /// lately).
    pub fn source_count(&self, key: &SourceKey) -> Option<SourceCount> {
        self.source_live.get(key, 0).ok()
    }

    /// Connector `id` as the kernel sees it (its limits and its rate's
    /// slot), as `FORGET_SOURCE` reads it.
    pub fn connector_config(&self, id: u32) -> Option<ConnectorConfig> {
        self.connectors.get(&id, 0).ok()
    }

    /// Counted connections, in every network namespace.
    pub fn established(&self) -> Vec<(ConnKey, FlowValue)> {
        self.established.iter().filter_map(Result::ok).collect()
    }

    /// Counted connections of the network namespace with cookie `netns`.
    pub fn established_in(&self, netns: u64) -> Vec<(FlowKey, FlowValue)> {
        self.established()
            .into_iter()
            .filter(|(conn, _)| conn.netns == netns)
            .map(|(conn, value)| (conn.flow, value))
            .collect()
    }

    /// Counters, summed over CPUs.
    pub fn stats(&self) -> Result<Stats, KernelError> {
        let mut stats = Stats::default();
        let rows = limiter_common::maps::MAX_CONNECTORS as usize;
        stats.connectors = vec![[0; stat::COUNT as usize]; rows];
        for (index, values) in self.stats.iter().enumerate() {
            let values = values.map_err(map_err(names::STATS))?;
            let total: u64 = values.iter().sum();
            let row = index / stat::COUNT as usize;
            let counter = index % stat::COUNT as usize;
            if row < rows {
                stats.connectors[row][counter] = total;
            } else {
                stats.global[counter] = total;
            }
        }
        Ok(stats)
    }

    /// Counts an established connection found in the socket table.
    pub fn seed(&mut self, flow: &FlowKey) -> Result<u32, KernelError> {
        self.control(control::SEED, flow)
    }

    /// Releases a seeded connection that is gone.
    pub fn release_seeded(&mut self, flow: &FlowKey) -> Result<bool, KernelError> {
        Ok(self.control(control::RELEASE_SEEDED, flow)? == control::DONE)
    }

    /// Releases any counted connection that is gone from the socket table.
    pub fn release_established(&mut self, flow: &FlowKey) -> Result<bool, KernelError> {
        Ok(self.control(control::RELEASE_ESTABLISHED, flow)? == control::DONE)
    }

    /// The ids of connectors that still hold counts.
    pub fn connector_ids_in_use(&self) -> HashSet<u32> {
        self.connector_state
            .iter()
            .enumerate()
            .filter_map(|(id, state)| match state {
                Ok(s) if s.live > 0 => Some(id as u32),
                _ => None,
            })
            .collect()
    }
}
