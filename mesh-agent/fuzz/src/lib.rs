//! What the fuzz targets share.

/// Runs `f` to completion on a fresh single-threaded runtime, timers enabled: each input gets a
/// clean runtime, so no state leaks from one input to the next.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(f)
}
