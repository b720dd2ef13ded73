//! The real Prometheus server (Debian's `prometheus`) run inside a test's
//! namespace with a given configuration and its own storage directory, and
//! queried over its HTTP API.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::tools::Proc;
use crate::{unique, Netns};

pub struct Prometheus {
    ns_name: String,
    pub port: u16,
    dir: PathBuf,
    _proc: Proc,
}

impl Prometheus {
    /// Starts Prometheus in `ns` with the configuration text `config` and
    /// waits until it answers.
    pub fn start(ns: &Netns, config: &str) -> Result<Prometheus> {
        let port = ns.run(|| {
            std::net::TcpListener::bind("127.0.0.1:0").map(|l| l.local_addr().unwrap().port())
        })??;
        let dir = std::env::temp_dir().join(unique("fe-prom-"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("prometheus.yml"), config)?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "prometheus"])
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting prometheus (Debian package `prometheus`; scripts/setup.sh --test installs it)")?;
        let p = Prometheus {
            ns_name: ns.name.clone(),
            port,
            dir,
            _proc: Proc(Some(child)),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while p.get("/-/ready").is_err() {
            if Instant::now() > deadline {
                bail!("prometheus not ready after 30s: {}", p.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(p)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// GET `path` on the server; the body of a 200 answer.
    fn get(&self, path: &str) -> Result<String> {
        let port = self.port;
        let path = path.to_string();
        Netns::borrowed(&self.ns_name).run(move || -> Result<String> {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut resp = String::new();
            s.read_to_string(&mut resp)?;
            let (head, body) = resp.split_once("\r\n\r\n").context("no HTTP body")?;
            if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
                bail!("{path}: {head}\n{body}");
            }
            Ok(body.to_string())
        })?
    }

    /// Evaluates a PromQL expression now; the `data.result` array.
    pub fn query(&self, expr: &str) -> Result<Vec<Value>> {
        let body = self.get(&format!("/api/v1/query?query={}", urlencode(expr)))?;
        let v: Value = serde_json::from_str(&body)?;
        if v["status"] != "success" {
            bail!("query {expr}: {body}");
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self._proc.term();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char);
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
