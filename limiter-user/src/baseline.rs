//! The benchmarks' reference programs and traffic generator (see
//! limiter-ebpf's `baseline` binary): never used by the daemon.

use aya::{
    Ebpf,
    maps::{Array, MapData, PerCpuArray, PerCpuValues},
    programs::{Xdp, XdpMode, links::FdLink},
};
use limiter_common::{
    maps::FlowKey,
    refusals::{CachedRefusal, REFUSAL_WAYS, RefusalKey},
};

use crate::kernel::{KernelError, map_err, prog_err};

/// The compiled baseline programs, built by this crate's build script.
pub static BASELINE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/baseline"));

/// XDP_PASS and nothing else.
pub const BARE_PASS: &str = "bare_pass";
/// XDP_DROP and nothing else.
pub const BARE_DROP: &str = "bare_drop";
/// Reads the headers and drops SYNs to port 25.
pub const HEADER_DROP: &str = "header_drop";
/// Reads the headers and drops a SYN to port 25 whose refusal key its
/// per-CPU array holds (see [`Baseline::remember_refusals`]).
pub const CACHE_DROP: &str = "cache_drop";
/// The SYN flood generator, for live-frames BPF_PROG_TEST_RUN.
pub const FLOOD_GEN: &str = "flood_gen";

/// The loaded baseline programs.
pub struct Baseline {
    ebpf: Ebpf,
    links: Vec<FdLink>,
}

impl Baseline {
    /// Loads the programs (nothing is attached).
    pub fn load() -> Result<Baseline, KernelError> {
        let mut ebpf = Ebpf::load(BASELINE_OBJECT).map_err(KernelError::Load)?;
        for name in [BARE_PASS, BARE_DROP, HEADER_DROP, CACHE_DROP, FLOOD_GEN] {
            let program: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or(KernelError::MissingProgram(name))?
                .try_into()
                .map_err(prog_err(name))?;
            program.load().map_err(prog_err(name))?;
        }
        Ok(Baseline {
            ebpf,
            links: Vec::new(),
        })
    }

    /// One of the programs, to run or attach.
    pub fn program(&self, name: &'static str) -> Result<&Xdp, KernelError> {
        self.ebpf
            .program(name)
            .ok_or(KernelError::MissingProgram(name))?
            .try_into()
            .map_err(prog_err(name))
    }

    /// Attaches program `name` to `iface` (in the caller's network
    /// namespace) until the `Baseline` is dropped.
    pub fn attach(
        &mut self,
        name: &'static str,
        iface: &str,
        mode: XdpMode,
    ) -> Result<(), KernelError> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .ok_or(KernelError::MissingProgram(name))?
            .try_into()
            .map_err(prog_err(name))?;
        let id = program.attach(iface, mode).map_err(prog_err(name))?;
        let link = program.take_link(id).map_err(prog_err(name))?;
        let link = FdLink::try_from(link).map_err(|e| KernelError::Interface {
            iface: iface.to_string(),
            reason: crate::kernel::error_chain(&e),
        })?;
        self.links.push(link);
        Ok(())
    }

    /// Sets how many source addresses the generator cycles through (a power
    /// of two, at most 65,536).
    pub fn set_flood_sources(&mut self, sources: u32) -> Result<(), KernelError> {
        let name = "FLOOD_SOURCES";
        let mut map: Array<&mut MapData, u32> = self
            .ebpf
            .map_mut(name)
            .ok_or(KernelError::MissingMap(name))?
            .try_into()
            .map_err(map_err(name))?;
        map.set(0, sources, 0).map_err(map_err(name))
    }

    /// Makes `cache_drop` refuse the SYNs of `flows` (their keys, whole
    /// addresses), on every CPU, each in a free slot of its key's set (a
    /// key it holds already stays where it is); returns how many flows
    /// were left out, their set full. On an error, the flows before stay
    /// written.
    pub fn remember_refusals(&mut self, flows: &[FlowKey]) -> Result<usize, KernelError> {
        let name = "CACHE";
        let mut map: PerCpuArray<&mut MapData, CachedRefusal> = self
            .ebpf
            .map_mut(name)
            .ok_or(KernelError::MissingMap(name))?
            .try_into()
            .map_err(map_err(name))?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| KernelError::Cpus(e))?;
        let mut left_out = 0;
        for flow in flows {
            let key = RefusalKey::of(flow, 128);
            let first = key.first_slot();
            let mut free = None;
            for slot in first..first + REFUSAL_WAYS {
                // Every CPU holds the same: this function is the only writer.
                let held = map.get(&slot, 0).map_err(map_err(name))?[0];
                if held.connector == 0 || held.holds(&key) {
                    free = Some(slot);
                    break;
                }
            }
            let Some(slot) = free else {
                left_out += 1;
                continue;
            };
            let entry = CachedRefusal {
                remote: key.remote,
                local: key.local,
                local_port: key.local_port,
                prefix_len: key.prefix_len,
                connector: 1,
                ..Default::default()
            };
            let values = PerCpuValues::try_from(vec![entry; cpus]).map_err(KernelError::Cpus)?;
            map.set(slot, values, 0).map_err(map_err(name))?;
        }
        Ok(left_out)
    }

    /// Frames the generator has produced, on all CPUs.
    pub fn flood_count(&self) -> Result<u64, KernelError> {
        let name = "FLOOD_COUNT";
        let map: PerCpuArray<&MapData, u64> = self
            .ebpf
            .map(name)
            .ok_or(KernelError::MissingMap(name))?
            .try_into()
            .map_err(map_err(name))?;
        let values = map.get(&0, 0).map_err(map_err(name))?;
        Ok(values.iter().sum())
    }
}
