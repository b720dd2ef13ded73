//! The Kafka consumer commands built on [`crate::bridge`]: `flowexport
//! enrich` (customer ids and AS numbers) and `flowexport split` (one topic
//! per customer).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use prometheus::{IntCounter, IntGauge, Registry};

use crate::bridge::{Bridge, BridgeArgs, Route, Transform};
use crate::enrich::{Enricher, Sources};
use crate::record::FlowRecord;

#[derive(Args, Debug, Clone)]
pub struct EnrichArgs {
    #[command(flatten)]
    pub bridge: BridgeArgs,
    /// Topic to write enriched flows to.
    #[arg(long, value_name = "TOPIC")]
    pub out_topic: String,
    /// Customer list: one `prefix,customer-id` per line (IPv4/IPv6, `#`
    /// comments); the longest prefix wins. Re-read on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub customers: PathBuf,
    /// ASN database: a MaxMind-format ASN database (.mmdb, e.g.
    /// GeoLite2-ASN) or a CSV of `prefix,asn[,name]` lines (recognised by
    /// content); fills src_as/dst_as and the AS names. Re-read on SIGHUP.
    #[arg(long, alias = "asn-csv", value_name = "FILE")]
    pub asn_db: Option<PathBuf>,
    /// Drop flows with no customer on either side (counted).
    #[arg(long)]
    pub drop_unmatched: bool,
    /// Prometheus endpoint address (serves /metrics).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9592")]
    pub metrics_addr: SocketAddr,
}

#[derive(Args, Debug, Clone)]
pub struct SplitArgs {
    #[command(flatten)]
    pub bridge: BridgeArgs,
    /// Each flow goes to `<prefix><cid>`.
    #[arg(long, value_name = "PREFIX", default_value = "flows-customer-")]
    pub topic_prefix: String,
    /// Topic for flows without a customer id; without it they are dropped
    /// (and counted).
    #[arg(long, value_name = "TOPIC")]
    pub unmatched_topic: Option<String>,
    /// Partitions of the per-customer topics split creates when missing
    /// (0: never create; they must exist).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub create_partitions: i32,
    /// Prometheus endpoint address (serves /metrics).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9593")]
    pub metrics_addr: SocketAddr,
}

struct Enrich {
    sources: Sources,
    enricher: Enricher,
    out_topic: String,
    drop_unmatched: bool,
    customer_prefixes: IntGauge,
    reloads: IntCounter,
}

impl Transform for Enrich {
    fn apply(&mut self, r: &mut FlowRecord) -> Route<'_> {
        if !self.enricher.apply(r) && self.drop_unmatched {
            return Route::Drop;
        }
        Route::To(&self.out_topic)
    }

    fn reload(&mut self) -> Result<()> {
        self.enricher = Enricher::load(&self.sources)?;
        self.customer_prefixes
            .set(self.enricher.customer_prefixes() as i64);
        self.reloads.inc();
        log::info!(
            "loaded {} customer prefixes, {} ASN prefixes",
            self.enricher.customer_prefixes(),
            self.enricher.asn_prefixes()
        );
        Ok(())
    }
}

struct Split {
    prefix: String,
    unmatched: Option<String>,
    topic: String,
}

impl Transform for Split {
    fn apply(&mut self, r: &mut FlowRecord) -> Route<'_> {
        if r.cid == 0 {
            return match &self.unmatched {
                Some(t) => Route::To(t),
                None => Route::Drop,
            };
        }
        use std::fmt::Write;
        self.topic.clear();
        let _ = write!(self.topic, "{}{}", self.prefix, r.cid);
        Route::To(&self.topic)
    }
}

pub fn run_enrich(args: EnrichArgs) -> Result<()> {
    let sources = Sources {
        customers: args.customers.clone(),
        asn_db: args.asn_db.clone(),
    };
    // Bad files stop us here, before any client exists.
    let enricher = Enricher::load(&sources).context("cannot start enrich")?;
    log::info!(
        "loaded {} customer prefixes, {} ASN prefixes",
        enricher.customer_prefixes(),
        enricher.asn_prefixes()
    );
    let registry = Registry::new();
    let g = crate::metrics::gauge(
        &registry,
        "flowexport_enrich_customer_prefixes",
        "Prefixes in the customer list now in use.",
    );
    g.set(enricher.customer_prefixes() as i64);
    let reloads = crate::metrics::counter(
        &registry,
        "flowexport_enrich_reloads_total",
        "Successful reloads of the files on SIGHUP.",
    );
    let mut t = Enrich {
        sources,
        enricher,
        out_topic: args.out_topic.clone(),
        drop_unmatched: args.drop_unmatched,
        customer_prefixes: g,
        reloads,
    };
    run(
        args.bridge,
        "flowexport-enrich",
        None,
        args.metrics_addr,
        registry,
        &mut t,
    )
}

pub fn run_split(args: SplitArgs) -> Result<()> {
    if args.create_partitions < 0 {
        bail!("--create-partitions must be 0 (never create) or more");
    }
    let mut t = Split {
        prefix: args.topic_prefix.clone(),
        unmatched: args.unmatched_topic.clone(),
        topic: String::new(),
    };
    let create = (args.create_partitions > 0).then_some(args.create_partitions);
    run(
        args.bridge,
        "flowexport-split",
        create,
        args.metrics_addr,
        Registry::new(),
        &mut t,
    )
}

/// Serves metrics, runs the bridge on this thread and turns signals into
/// its stop (SIGINT/SIGTERM) and reload (SIGHUP) flags.
fn run(
    bargs: BridgeArgs,
    group: &str,
    create_topics: Option<i32>,
    metrics_addr: SocketAddr,
    registry: Registry,
    t: &mut dyn Transform,
) -> Result<()> {
    let in_topic = bargs.in_topic.clone();
    let mut bridge = Bridge::new(bargs, group, create_topics, &registry)?;
    let service = crate::runtime::start(
        metrics_addr,
        &registry,
        true,
        "finishing the batch and stopping",
    )?;
    log::info!("reading topic {in_topic} (metrics on http://{metrics_addr}/metrics)");
    let res = bridge.run(t, &service.stop, &service.reload);
    service.runtime.shutdown_background();
    res
}
