//! A private `redis-server` for benches: started on a free loopback port,
//! stopped on drop. Absent when `redis-server` is not installed.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A running `redis-server`, killed on drop.
pub struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    /// Starts one, or `None` when `redis-server` is not on the PATH.
    pub fn start() -> Result<Option<RedisServer>> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = match Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).context("starting redis-server"),
        };
        let server = RedisServer { child, port };
        let start = Instant::now();
        loop {
            if let Ok(mut con) = redis::Client::open(server.url()).and_then(|c| c.get_connection())
                && redis::cmd("PING").query::<String>(&mut con).is_ok()
            {
                return Ok(Some(server));
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("redis-server on port {port} did not answer within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The median time of a plain SET then GET of `payload` with the same
    /// client library: the floor under a Redis tier's put and get.
    pub fn raw_set_get(&self, runs: usize, payload: &[u8]) -> Result<Duration> {
        let mut con = redis::Client::open(self.url())?.get_connection()?;
        let time = crate::bench::median(runs, || {
            let set: redis::RedisResult<()> =
                redis::cmd("SET").arg("raw").arg(payload).query(&mut con);
            let got: redis::RedisResult<Vec<u8>> = redis::cmd("GET").arg("raw").query(&mut con);
            std::hint::black_box((set.is_ok(), got.map(|g| g.len()).ok()));
        });
        Ok(time)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
