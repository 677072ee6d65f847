//! The agent's own `process_*` families, with the names every Prometheus client uses.
//!
//! Written here rather than taken from the `prometheus` crate's process collector, which on each
//! scrape opens and parses four procfs files (`/proc/self/limits` alone costs more than the rest
//! of a scrape's rendering) and reports CPU in whole clock ticks turned into whole seconds, so an
//! idle agent showed 0. This one reads one procfs file per scrape, takes CPU time from
//! `getrusage` (microseconds), and reads what cannot change (the start time) once.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

use prometheus::{
    Counter, Gauge, IntGauge, Opts,
    core::{Collector, Desc},
    proto::MetricFamily,
};

/// How often a scrape may recount the open descriptors: listing `/proc/self/fd` costs the
/// kernel a dentry per descriptor, the larger part of a scrape on a node with many connections.
const FD_RECOUNT: Duration = Duration::from_secs(10);

/// `process_*`: CPU, memory, threads, file descriptors and start time.
#[derive(Debug)]
pub struct ProcessCollector {
    /// `/proc/self/stat`, kept open and re-read from offset 0 (no path lookup per scrape).
    stat: Option<std::fs::File>,
    /// The last descriptor count and when it was taken.
    fds_at: Mutex<Option<Instant>>,
    cpu: Counter,
    resident: IntGauge,
    virtual_: IntGauge,
    threads: IntGauge,
    open_fds: IntGauge,
    max_fds: IntGauge,
    start_time: Gauge,
    page_size: i64,
}

impl ProcessCollector {
    /// The families, with the start time read now.
    pub fn new() -> Result<Self, prometheus::Error> {
        let c = Self {
            stat: std::fs::File::open("/proc/self/stat").ok(),
            fds_at: Mutex::new(None),
            cpu: Counter::with_opts(Opts::new(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
            ))?,
            resident: IntGauge::new(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
            )?,
            virtual_: IntGauge::new(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
            )?,
            threads: IntGauge::new("process_threads", "Number of OS threads in the process.")?,
            open_fds: IntGauge::new("process_open_fds", "Number of open file descriptors.")?,
            max_fds: IntGauge::new(
                "process_max_fds",
                "Maximum number of open file descriptors.",
            )?,
            start_time: Gauge::new(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
            )?,
            // SAFETY: sysconf has no preconditions.
            page_size: unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1),
        };
        if let Some(t) = c
            .stat
            .as_ref()
            .and_then(Stat::reread)
            .and_then(|s| start_time(&s))
        {
            c.start_time.set(t);
        }
        Ok(c)
    }

    fn families(&self) -> [&dyn Collector; 7] {
        [
            &self.cpu,
            &self.resident,
            &self.virtual_,
            &self.threads,
            &self.open_fds,
            &self.max_fds,
            &self.start_time,
        ]
    }

    /// Reads the process's figures into the families.
    fn refresh(&self) {
        if let Some(secs) = cpu_seconds() {
            // A counter only rises; getrusage never goes back, but a float sum could round.
            let seen = self.cpu.get();
            if secs > seen {
                self.cpu.inc_by(secs - seen);
            }
        }
        if let Some(stat) = self.stat.as_ref().and_then(Stat::reread) {
            self.resident.set(stat.rss_pages * self.page_size);
            self.virtual_.set(stat.vsize);
            self.threads.set(stat.threads);
        }
        let mut fds_at = self.fds_at.lock();
        if fds_at.is_none_or(|at| at.elapsed() >= FD_RECOUNT)
            && let Ok(dir) = std::fs::read_dir("/proc/self/fd")
        {
            // The directory handle itself is one of the entries.
            let n = dir.count().saturating_sub(1);
            self.open_fds.set(i64::try_from(n).unwrap_or(i64::MAX));
            *fds_at = Some(Instant::now());
        }
        drop(fds_at);
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } == 0 {
            self.max_fds
                .set(i64::try_from(lim.rlim_cur).unwrap_or(i64::MAX));
        }
    }
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.families()
            .into_iter()
            .flat_map(Collector::desc)
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.refresh();
        self.families()
            .into_iter()
            .flat_map(Collector::collect)
            .collect()
    }
}

/// User plus system CPU time of every thread, from `getrusage`.
fn cpu_seconds() -> Option<f64> {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct it is given.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut ru) } != 0 {
        return None;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(tv(ru.ru_utime) + tv(ru.ru_stime))
}

/// The fields of `/proc/self/stat` a scrape reports.
struct Stat {
    threads: i64,
    vsize: i64,
    rss_pages: i64,
    /// Clock ticks after boot at which the process started.
    start_ticks: u64,
}

impl Stat {
    /// Reads an open `/proc/<pid>/stat` again from its start.
    fn reread(file: &std::fs::File) -> Option<Self> {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 1024];
        let n = file.read_at(&mut buf, 0).ok()?;
        Self::parse(std::str::from_utf8(buf.get(..n)?).ok()?)
    }

    /// Parses `/proc/<pid>/stat`. The command name is in parentheses and may hold spaces, so the
    /// fields are counted from after its closing one (field 3, `state`, is then index 0).
    fn parse(text: &str) -> Option<Self> {
        let rest = text.get(text.rfind(')')? + 2..)?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<i64>().ok());
        Some(Self {
            threads: field(20)?,
            start_ticks: u64::try_from(field(22)?).ok()?,
            vsize: field(23)?,
            rss_pages: field(24)?,
        })
    }
}

/// When the process started, in seconds since the epoch: boot time (`btime` in `/proc/stat`)
/// plus the start tick count.
fn start_time(stat: &Stat) -> Option<f64> {
    let btime: f64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(btime + stat.start_ticks as f64 / hz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_a_command_name_with_spaces() {
        // Field numbers as in proc(5): 20 num_threads, 22 starttime, 23 vsize, 24 rss.
        let line = "4242 (mesh agent) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 \
                    5 0 123456 987654 321 18446744073709551615";
        let s = Stat::parse(line).expect("parses");
        assert_eq!(
            (s.threads, s.start_ticks, s.vsize, s.rss_pages),
            (5, 123_456, 987_654, 321)
        );
        assert!(Stat::parse("garbage").is_none());
    }

    #[test]
    fn own_process_reports_cpu_memory_and_descriptors() {
        let c = ProcessCollector::new().expect("families");
        // Burn a little CPU so the counter cannot be 0 by rounding.
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let fams = c.collect();
        let value = |name: &str| {
            let f = fams.iter().find(|f| f.name() == name).expect(name);
            let m = &f.get_metric()[0];
            if f.get_field_type() == prometheus::proto::MetricType::COUNTER {
                m.get_counter().get_value()
            } else {
                m.get_gauge().get_value()
            }
        };
        assert!(value("process_cpu_seconds_total") >= 0.02);
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        assert!(value("process_threads") >= 1.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        let start = value("process_start_time_seconds");
        assert!(
            start > now - 86_400.0 && start <= now + 1.0,
            "{start} vs {now}"
        );
    }
}
