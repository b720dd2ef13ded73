//! `flowexport enrich`: read flows from Kafka, add customer ids (CIDR list)
//! and AS numbers, write them to another topic; at least once, on
//! `kafka::bridge`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use prometheus::{IntCounter, IntGauge, Registry};

use crate::enrich::{Enricher, Sources};
use crate::kafka::bridge::{serve, BridgeArgs, Route, Transform};
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

pub fn run(args: EnrichArgs) -> Result<()> {
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
    serve(
        args.bridge,
        "flowexport-enrich",
        None,
        args.metrics_addr,
        registry,
        &mut t,
    )
}
