//! What every long-running command (agent, collect, enrich, split,
//! dashboard) runs around its own work: a small tokio runtime serving
//! `/metrics`, and SIGINT/SIGTERM (and, when asked for, SIGHUP) turned into
//! flags the work checks and a future it can wait on.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use prometheus::Registry;
use tokio::sync::Notify;

use crate::metrics::{render_registry, serve};

/// The runtime serving `/metrics`, and what the signals set.
pub(crate) struct CommandRuntime {
    pub runtime: tokio::runtime::Runtime,
    /// Set on SIGINT or SIGTERM.
    pub stop: Arc<AtomicBool>,
    /// Set on SIGHUP (when asked for; else SIGHUP keeps its default action).
    pub reload: Arc<AtomicBool>,
    stopped: Arc<Notify>,
    /// What the log says when stopping ("shutting down").
    stopping: &'static str,
}

impl CommandRuntime {
    /// Resolves once SIGINT or SIGTERM has come.
    pub(crate) async fn stopped(&self) {
        loop {
            let woken = self.stopped.notified();
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            woken.await;
        }
    }

    /// Blocks until SIGINT or SIGTERM (or a `stopper` call).
    pub(crate) fn wait_for_stop(&self) {
        self.runtime.block_on(self.stopped());
    }

    /// Stops the command as SIGTERM does, from any thread (for example when
    /// its output has gone away), logging "{why}: {stopping}".
    pub(crate) fn stopper(&self, why: &'static str) -> impl FnOnce() + Send + 'static {
        let (stop, stopped, stopping) = (self.stop.clone(), self.stopped.clone(), self.stopping);
        move || {
            log::info!("{why}: {stopping}");
            stop.store(true, Ordering::Relaxed);
            stopped.notify_waiters();
        }
    }
}

/// Serves `registry` on `metrics_addr` and watches SIGINT/SIGTERM (logged
/// as "SIGINT: {stopping}") and, with `hangup`, SIGHUP.
pub(crate) fn start(
    metrics_addr: SocketAddr,
    registry: &Registry,
    hangup: bool,
    stopping: &'static str,
) -> Result<CommandRuntime> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let reg = registry.clone();
    runtime
        .block_on(serve(metrics_addr, Arc::new(move || render_registry(&reg))))
        .with_context(|| {
            format!(
                "cannot serve metrics on {metrics_addr} (in use? choose another with \
                 --metrics-addr)"
            )
        })?;
    let stop = Arc::new(AtomicBool::new(false));
    let reload = Arc::new(AtomicBool::new(false));
    let stopped = Arc::new(Notify::new());
    // Installed before returning, so a signal from now on is caught.
    let handlers = runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate())?;
        let int = signal(SignalKind::interrupt())?;
        let hup = if hangup {
            Some(signal(SignalKind::hangup())?)
        } else {
            None
        };
        std::io::Result::Ok((term, int, hup))
    });
    let (mut term, mut int, mut hup) = handlers.context("installing the signal handlers")?;
    {
        let (stop, reload, stopped) = (stop.clone(), reload.clone(), stopped.clone());
        runtime.spawn(async move {
            loop {
                tokio::select! {
                    _ = int.recv() => { log::info!("SIGINT: {stopping}"); break; }
                    _ = term.recv() => { log::info!("SIGTERM: {stopping}"); break; }
                    Some(_) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                        reload.store(true, Ordering::Relaxed);
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
            stopped.notify_waiters();
        });
    }
    Ok(CommandRuntime {
        runtime,
        stop,
        reload,
        stopped,
        stopping,
    })
}
