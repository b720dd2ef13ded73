//! `flowexport split`: read enriched flows from Kafka and write each to its
//! customer's topic `<prefix><cid>`; at least once, on
//! `kafka::bridge`.

use std::net::SocketAddr;

use anyhow::{bail, Result};
use clap::Args;
use prometheus::Registry;

use crate::kafka::bridge::{serve, BridgeArgs, Route, Transform};
use crate::record::FlowRecord;

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

pub fn run(args: SplitArgs) -> Result<()> {
    if args.create_partitions < 0 {
        bail!("--create-partitions must be 0 (never create) or more");
    }
    let mut t = Split {
        prefix: args.topic_prefix.clone(),
        unmatched: args.unmatched_topic.clone(),
        topic: String::new(),
    };
    let create = (args.create_partitions > 0).then_some(args.create_partitions);
    serve(
        args.bridge,
        "flowexport-split",
        create,
        args.metrics_addr,
        Registry::new(),
        &mut t,
    )
}
