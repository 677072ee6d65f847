//! The kernel programs' rare events into the agent's log. The programs write them with aya-log
//! (a refused steer, a map too full to record a connection; never per packet) to a ring that
//! each agent creates with its programs; this reads the ring whenever it has records and logs
//! each one at debug level under this module's target, so `/logging` can turn them on
//! (`mesh_agent::capture=debug`) without raising the rest. Every such event is also counted in
//! `EVENTS` (`mesh_bpf_events_total`), whether or not it is logged.

use tokio::io::{Interest, unix::AsyncFd};
use tracing::{debug, warn};

/// Hands aya-log's records to `tracing`.
#[derive(Debug, Clone, Copy)]
pub struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        debug!(program = record.target(), "kernel: {}", record.args());
    }

    fn flush(&self) {}
}

/// The reader of the programs' log ring.
pub type KernelLogger = aya_log::EbpfLogger<KernelLog>;

/// Forwards records for as long as the agent runs. Owns the logger, and with it the ring's
/// descriptor, which the programs' maps must keep (dropping it breaks a later program load).
pub async fn forward(logger: KernelLogger) {
    // SAFETY: the logger owns the ring's descriptor and keeps it (one map, never replaced)
    // until it is dropped, which is when the AsyncFd is.
    let registered = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!(
                "cannot watch the kernel programs' log ring: {}; their rare events are only counted",
                e.into_parts().1
            );
            return;
        }
    };
    loop {
        match fd.readable_mut().await {
            Ok(mut ready) => {
                ready.get_inner_mut().flush();
                ready.clear_ready();
            }
            Err(e) => {
                warn!(
                    "the kernel programs' log ring failed: {e}; their rare events are only counted"
                );
                return;
            }
        }
    }
}
