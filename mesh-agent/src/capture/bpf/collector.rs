//! The kernel's side of `/metrics`: the programs' event counters and how full each map is.
//!
//! Read at scrape time from the pinned maps (through this collector's own file descriptors, so a
//! scrape never waits on the reconcile loop's lock). The programs count per CPU, without atomics;
//! the sum over CPUs is exported.
//!
//! Families:
//! - `mesh_bpf_events_total{hook, outcome, reason}`: one series per `mesh_common::events` slot;
//! - `mesh_bpf_map_entries{map}` and `mesh_bpf_map_capacity{map}`: fill level of every hash map.
//!
//! Counting a hash map's entries walks its buckets, and the kernel does that without yielding:
//! about 100 µs for a 64 Ki-entry map, however empty. A scrape therefore recounts the big maps
//! (the original-destination ones) at most every [`BIG_MAP_RECOUNT`], so frequent scraping does
//! not stall the CPU the proxy is using; the small ones are counted every time.

use std::{
    os::fd::{AsFd, AsRawFd},
    path::Path,
    time::{Duration, Instant},
};

use parking_lot::Mutex;

use aya::maps::{Map, MapData, PerCpuArray};
use mesh_common::{events, maps};
use prometheus::{
    IntCounterVec, IntGaugeVec, Opts,
    core::{Collector, Desc},
    proto::MetricFamily,
};

use super::sys::BpfError;

/// How often a scrape may recount a big map.
pub const BIG_MAP_RECOUNT: Duration = Duration::from_secs(10);
/// Maps above this capacity are big.
const BIG_MAP: u32 = 4096;

/// One map whose fill level is reported.
#[derive(Debug)]
struct Counted {
    name: &'static str,
    data: MapData,
    key_size: usize,
    capacity: u32,
    /// A big map's last count and when it was taken.
    last: Mutex<Option<(Instant, u64)>>,
}

impl Counted {
    /// The entry count, recounted if the map is small or the last count is stale.
    fn entries(&self) -> u64 {
        if self.capacity <= BIG_MAP {
            return count_entries(self);
        }
        let mut last = self.last.lock();
        match *last {
            Some((at, n)) if at.elapsed() < BIG_MAP_RECOUNT => n,
            _ => {
                let n = count_entries(self);
                *last = Some((Instant::now(), n));
                n
            }
        }
    }
}

/// Reads the pinned maps on every scrape.
pub struct KernelCollector {
    events: PerCpuArray<MapData, u64>,
    maps: Vec<Counted>,
    events_total: IntCounterVec,
    entries: IntGaugeVec,
    capacity: IntGaugeVec,
    /// Scrapes run one at a time: each turns kernel totals into counter increments.
    scrape: Mutex<()>,
}

fn open_err(
    name: &'static str,
    what: &'static str,
) -> impl FnOnce(aya::maps::MapError) -> BpfError {
    move |e| BpfError::Map {
        name,
        what: what.into(),
        source: Box::new(e),
    }
}

impl KernelCollector {
    /// Opens the maps pinned under `maps_dir`.
    pub fn open(maps_dir: &Path) -> Result<Self, BpfError> {
        let data = PerCpuArray::try_from(Map::PerCpuArray(
            MapData::from_pin(maps_dir.join(maps::EVENTS))
                .map_err(open_err(maps::EVENTS, "open pinned"))?,
        ))
        .map_err(open_err(maps::EVENTS, "open as per-CPU array"))?;
        let mut counted = Vec::new();
        for name in maps::ALL {
            if name == maps::EVENTS {
                continue;
            }
            let map =
                MapData::from_pin(maps_dir.join(name)).map_err(open_err(name, "open pinned"))?;
            let info = map.info().map_err(open_err(name, "read info"))?;
            counted.push(Counted {
                name,
                key_size: info.key_size() as usize,
                capacity: info.max_entries(),
                data: map,
                last: Mutex::new(None),
            });
        }
        let fam = |e| BpfError::Map {
            name: maps::EVENTS,
            what: "make metric family".into(),
            source: Box::new(aya::maps::MapError::IoError(std::io::Error::other(
                format!("{e}"),
            ))),
        };
        Ok(Self {
            events: data,
            maps: counted,
            events_total: IntCounterVec::new(
                Opts::new(
                    "mesh_bpf_events_total",
                    "What the capture programs did, by hook, outcome and reason",
                ),
                &["hook", "outcome", "reason"],
            )
            .map_err(fam)?,
            entries: IntGaugeVec::new(
                Opts::new("mesh_bpf_map_entries", "Entries in each BPF map"),
                &["map"],
            )
            .map_err(fam)?,
            capacity: IntGaugeVec::new(
                Opts::new(
                    "mesh_bpf_map_capacity",
                    "Most entries each BPF map can hold",
                ),
                &["map"],
            )
            .map_err(fam)?,
            scrape: Mutex::new(()),
        })
    }

    /// The kernel's total for each `events` slot, summed over CPUs.
    pub fn event_totals(&self) -> Vec<u64> {
        (0..events::COUNT)
            .map(|i| {
                self.events
                    .get(&i, 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or_default()
            })
            .collect()
    }
}

impl std::fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelCollector")
            .field("maps", &self.maps)
            .finish_non_exhaustive()
    }
}

/// One map's fill level, for `/config_dump`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MapSummary {
    /// Map name.
    pub name: &'static str,
    /// Entries now.
    pub entries: u64,
    /// Most it can hold.
    pub capacity: u32,
}

impl KernelCollector {
    /// Every map's fill level, and the event totals by `hook/outcome/reason`.
    pub fn summary(&self) -> (Vec<MapSummary>, std::collections::BTreeMap<String, u64>) {
        let maps = self
            .maps
            .iter()
            .map(|m| MapSummary {
                name: m.name,
                entries: count_entries(m),
                capacity: m.capacity,
            })
            .collect();
        let events = self
            .event_totals()
            .into_iter()
            .zip(events::LABELS)
            .map(|(n, (hook, outcome, reason))| (format!("{hook}/{outcome}/{reason}"), n))
            .collect();
        (maps, events)
    }
}

/// `BPF_MAP_GET_NEXT_KEY`.
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

#[repr(C)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
    flags: u64,
}

/// Counts a hash map's entries by walking its keys (one syscall per entry; the maps that can
/// be large are drained by the proxy as it accepts, so they stay small in practice).
fn count_entries(map: &Counted) -> u64 {
    let fd = map.data.fd().as_fd().as_raw_fd();
    let mut key = vec![0u8; map.key_size.max(1)];
    let mut next = vec![0u8; map.key_size.max(1)];
    let mut n = 0u64;
    let mut first = true;
    // The bound stops a walk that a concurrent writer keeps restarting.
    while n <= u64::from(map.capacity) {
        let attr = NextKeyAttr {
            map_fd: fd as u32,
            _pad: 0,
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `attr` points at buffers of the map's key size, alive for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &raw const attr,
                std::mem::size_of::<NextKeyAttr>(),
            )
        };
        if rc != 0 {
            break;
        }
        n += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
    n
}

impl Collector for KernelCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.events_total
            .desc()
            .into_iter()
            .chain(self.entries.desc())
            .chain(self.capacity.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _one = self.scrape.lock();
        for (total, (hook, outcome, reason)) in self.event_totals().iter().zip(events::LABELS) {
            let c = self
                .events_total
                .with_label_values(&[hook, outcome, reason]);
            let seen = c.get();
            if *total >= seen {
                c.inc_by(total - seen);
            } else {
                // The maps were recreated (not adopted): the kernel's count restarted.
                c.reset();
                c.inc_by(*total);
            }
        }
        for m in &self.maps {
            let n = m.entries();
            self.entries
                .with_label_values(&[m.name])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
            self.capacity
                .with_label_values(&[m.name])
                .set(i64::from(m.capacity));
        }
        let mut out = self.events_total.collect();
        out.extend(self.entries.collect());
        out.extend(self.capacity.collect());
        out
    }
}
