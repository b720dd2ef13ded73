//! What the long-running Kafka consumer commands (enrich, split, dashboard)
//! share around their loop: the metrics endpoint on a small runtime, and
//! signals turned into flags the loop checks.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use prometheus::Registry;

use crate::metrics::{render_registry, serve};

/// The runtime serving `/metrics`, and the flags signals set.
pub struct Service {
    pub runtime: tokio::runtime::Runtime,
    /// Set on SIGINT or SIGTERM.
    pub stop: Arc<AtomicBool>,
    /// Set on SIGHUP (when asked for; else SIGHUP keeps its default action).
    pub reload: Arc<AtomicBool>,
}

/// Serves `registry` on `metrics_addr` and watches SIGINT/SIGTERM (logged
/// as "SIGINT: {stopping}") and, with `hangup`, SIGHUP.
pub fn start(
    metrics_addr: SocketAddr,
    registry: &Registry,
    hangup: bool,
    stopping: &'static str,
) -> Result<Service> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let reg = registry.clone();
    runtime
        .block_on(serve(metrics_addr, Arc::new(move || render_registry(&reg))))
        .with_context(|| format!("cannot serve metrics on {metrics_addr}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let reload = Arc::new(AtomicBool::new(false));
    {
        let (stop, reload) = (stop.clone(), reload.clone());
        runtime.spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut term) = signal(SignalKind::terminate()) else {
                log::error!("cannot install signal handlers");
                return;
            };
            let mut hup = if hangup {
                match signal(SignalKind::hangup()) {
                    Ok(h) => Some(h),
                    Err(_) => {
                        log::error!("cannot install signal handlers");
                        return;
                    }
                }
            } else {
                None
            };
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => { log::info!("SIGINT: {stopping}"); break; }
                    _ = term.recv() => { log::info!("SIGTERM: {stopping}"); break; }
                    Some(_) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                        reload.store(true, Ordering::Relaxed)
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
    }
    Ok(Service {
        runtime,
        stop,
        reload,
    })
}
