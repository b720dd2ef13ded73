//! A Tansu broker (SQLite storage) for the benchmarks, on a free loopback
//! port with its own state directory, killed on drop.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct Tansu {
    child: Child,
    dir: std::path::PathBuf,
    port: u16,
}

impl Tansu {
    /// Starts a broker on a free loopback port and creates `topic` (1 partition).
    pub fn start(topic: &str) -> Result<Tansu> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = std::env::temp_dir().join(format!("fe-bench-tansu-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let url = format!("tcp://127.0.0.1:{port}");
        let bin = std::env::var("TANSU_BIN").unwrap_or_else(|_| "tansu".into());
        let child = Command::new(&bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {bin}: install it with scripts/setup.sh --test"))?;
        let t = Tansu { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("tansu did not listen within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = Command::new(&bin)
            .args([
                "topic",
                "create",
                topic,
                "--broker",
                &url,
                "--partitions",
                "1",
            ])
            .output()?;
        if !out.status.success() {
            bail!(
                "creating the topic: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(t)
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
