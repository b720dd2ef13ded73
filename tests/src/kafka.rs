//! A real Kafka-protocol broker for tests and benchmarks: Tansu with SQLite
//! storage, run inside a test's network namespace on its loopback (or, for
//! the benchmarks, on the host's loopback: [`Broker::start_host`]), with its
//! own state directory. Topics are created explicitly (Tansu does not auto-create).
//! Clients run on threads that entered the namespace, so librdkafka's own
//! threads (created with the client) live there too.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, ToBytes};
use rdkafka::producer::{BaseRecord, ProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use crate::{unique, Netns};

/// The Tansu binary: $TANSU_BIN, else `tansu` on PATH (scripts/setup.sh
/// installs it with cargo).
pub fn tansu_bin() -> String {
    std::env::var("TANSU_BIN").unwrap_or_else(|_| "tansu".to_string())
}

/// Sends `rec`, waiting `pause` at a time while the producer's queue is
/// full.
pub fn send_retrying<C, K, P>(
    p: &ThreadedProducer<C>,
    mut rec: BaseRecord<'_, K, P>,
    pause: Duration,
) where
    C: ProducerContext<DeliveryOpaque = ()> + 'static,
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    loop {
        match p.send(rec) {
            Ok(()) => return,
            Err((_, r)) => {
                rec = r;
                std::thread::sleep(pause);
            }
        }
    }
}

pub struct Broker {
    /// The namespace it runs in; None: the host's.
    ns_name: Option<String>,
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// One consumed message.
#[derive(Clone, Debug)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Broker {
    /// Starts a broker in `ns` on a free loopback port.
    pub fn start(ns: &Netns) -> Result<Broker> {
        // A port that is free in this namespace (its loopback is private).
        let port = ns.run(|| {
            std::net::TcpListener::bind("127.0.0.1:0").map(|l| l.local_addr().unwrap().port())
        })??;
        Broker::launch(Some(ns.name.clone()), port)
    }

    /// Starts a broker in `ns` with `topics` (name, partitions) created.
    pub fn start_with(ns: &Netns, topics: &[(&str, u32)]) -> Result<Broker> {
        let b = Broker::start(ns)?;
        for (name, partitions) in topics {
            b.create_topic(name, *partitions)?;
        }
        Ok(b)
    }

    /// Starts a broker on a free port of the host's loopback (benchmarks).
    pub fn start_host() -> Result<Broker> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        Broker::launch(None, port)
    }

    /// A broker with a new state directory on `port` of the loopback of
    /// namespace `ns_name` (None: the host's), started.
    fn launch(ns_name: Option<String>, port: u16) -> Result<Broker> {
        let dir = std::env::temp_dir().join(unique("fe-tansu-"));
        std::fs::create_dir_all(&dir)?;
        let mut b = Broker {
            ns_name,
            port,
            dir,
            child: None,
        };
        b.spawn()?;
        Ok(b)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Runs `f` on a thread in the broker's namespace.
    fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        match &self.ns_name {
            Some(ns) => Netns::borrowed(ns).run(f),
            None => Ok(f()),
        }
    }

    /// `tansu` run in the broker's namespace.
    fn tansu(&self) -> Command {
        match &self.ns_name {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(tansu_bin());
                c
            }
            None => Command::new(tansu_bin()),
        }
    }

    fn spawn(&mut self) -> Result<()> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tansu.log"))?;
        let child = self
            .tansu()
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (install it with scripts/setup.sh or set TANSU_BIN)",
                    tansu_bin()
                )
            })?;
        self.child = Some(child);
        let port = self.port;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let up = self.within(move || TcpStream::connect(("127.0.0.1", port)).is_ok())?;
            if up {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                bail!("tansu exited ({status}): {}", self.log());
            }
            if Instant::now() > deadline {
                bail!("tansu not listening after 20s: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("tansu.log")).unwrap_or_default()
    }

    /// Stops the broker (SIGTERM, then SIGKILL after 10 s). Its data stays.
    pub fn stop(&mut self) {
        if let Some(c) = self.child.take() {
            crate::tools::stop_child(c, libc::SIGTERM);
        }
    }

    /// Starts the broker again on the same port and data.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
    }

    pub fn create_topic(&self, name: &str, partitions: u32) -> Result<()> {
        let out = self
            .tansu()
            .args(["topic", "create", name, "--broker"])
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .args(["--partitions", &partitions.to_string()])
            .output()?;
        if !out.status.success() {
            bail!(
                "tansu topic create {name}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Produces `(key, payload)` messages to `topic` (acks=all) and waits
    /// until the broker acknowledged all of them.
    pub fn produce(&self, topic: &str, msgs: Vec<(Vec<u8>, Vec<u8>)>) -> Result<()> {
        let brokers = self.addr();
        let topic = topic.to_string();
        self.within(move || -> Result<()> {
            use rdkafka::producer::Producer;
            let p: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
                ClientConfig::new()
                    .set("bootstrap.servers", &brokers)
                    .set("acks", "all")
                    .set("queue.buffering.max.messages", "1000000")
                    .create()?;
            for (k, v) in &msgs {
                let rec = BaseRecord::to(&topic).key(k).payload(v);
                send_retrying(&p, rec, Duration::from_millis(5));
            }
            p.flush(Duration::from_secs(60))?;
            Ok(())
        })?
    }

    /// Messages in `topic` (sum of its partitions' high watermarks minus
    /// low); 0 while the topic does not exist.
    pub fn count(&self, topic: &str) -> u64 {
        let brokers = self.addr();
        let topic = topic.to_string();
        self.within(move || -> Result<u64> {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .create()?;
            let md = c.fetch_metadata(Some(&topic), Duration::from_secs(5))?;
            let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
                return Ok(0);
            };
            let mut n = 0;
            for p in t.partitions() {
                let (lo, hi) = c.fetch_watermarks(&topic, p.id(), Duration::from_secs(5))?;
                n += (hi - lo) as u64;
            }
            Ok(n)
        })
        .and_then(|r| r)
        .unwrap_or(0)
    }

    /// Reads every message of `topic` from the beginning up to the high
    /// watermark of each partition at the time of the call.
    pub fn consume_all(&self, topic: &str) -> Result<Vec<Consumed>> {
        let brokers = self.addr();
        let topic = topic.to_string();
        self.within(move || -> Result<Vec<Consumed>> {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", unique("fe-test-"))
                .set("enable.auto.commit", "false")
                .create()?;
            let md = c.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
            let t = md
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .context("topic missing")?;
            let mut tpl = TopicPartitionList::new();
            let mut remaining = 0i64;
            let mut highs = std::collections::HashMap::new();
            for p in t.partitions() {
                let (lo, hi) = c.fetch_watermarks(&topic, p.id(), Duration::from_secs(10))?;
                highs.insert(p.id(), hi);
                remaining += hi - lo;
                tpl.add_partition_offset(&topic, p.id(), Offset::Beginning)?;
            }
            c.assign(&tpl)?;
            let mut out = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            while remaining > 0 {
                if Instant::now() > deadline {
                    bail!("{remaining} messages of {topic} not consumed within 60s");
                }
                let Some(m) = c.poll(Duration::from_millis(500)) else {
                    continue;
                };
                let m = m?;
                if m.offset() < highs[&m.partition()] {
                    remaining -= 1;
                    out.push(Consumed {
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().unwrap_or_default().to_vec(),
                        payload: m.payload().unwrap_or_default().to_vec(),
                    });
                }
            }
            Ok(out)
        })?
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
