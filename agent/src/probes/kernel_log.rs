//! The kernel side's log: aya-log records drained from their ring into the agent's own log.

use std::os::fd::AsRawFd;

use aya::Ebpf;
use tokio::io::unix::AsyncFd;

use super::ProbesError;

/// Forwards the kernel side's aya-log records into the agent's own log, target `kernel`.
struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args().to_string();
        match record.level() {
            log::Level::Error => tracing::error!(target: "kernel", "{message}"),
            log::Level::Warn => tracing::warn!(target: "kernel", "{message}"),
            log::Level::Info => tracing::info!(target: "kernel", "{message}"),
            log::Level::Debug => tracing::debug!(target: "kernel", "{message}"),
            log::Level::Trace => tracing::trace!(target: "kernel", "{message}"),
        }
    }

    fn flush(&self) {}
}

/// Starts the task that drains the kernel log ring. The logger must outlive the programs
/// (dropping it closes the ring's map), so the task owns it for the life of the runtime.
pub(super) fn spawn_kernel_log(ebpf: &mut Ebpf) -> Result<(), ProbesError> {
    let logger =
        aya_log::EbpfLogger::init_with_logger(ebpf, KernelLog).map_err(ProbesError::Log)?;
    let fd = logger.as_raw_fd();
    tracing::debug!(fd, "kernel log ring open");
    // SAFETY: the logger owns its ring buffer's fd, which stays open and the same for as long as
    // the logger lives, and the AsyncFd owns the logger.
    let mut logger =
        unsafe { AsyncFd::register(logger) }.map_err(|e| ProbesError::LogFd(e.into_parts().1))?;
    crate::tasks::spawn("kernel-log", async move {
        loop {
            let mut guard = match logger.readable_mut().await {
                Ok(guard) => guard,
                Err(e) => {
                    tracing::warn!(error = %e, "kernel log reader stopped");
                    return;
                }
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}
