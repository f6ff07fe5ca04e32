//! Test support for sllm: a private `redis-server` per test or suite (unix socket, no
//! persistence, gone when dropped) and helpers to get a kvstore [`Store`] on it.
//!
//! Nothing here mocks Redis; it starts the real server from Debian's `redis-server` package.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kvstore::{Store, StoreConfig};

/// A private redis-server, killed (and its directory removed) on drop.
pub struct RedisServer {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl RedisServer {
    /// Starts `redis-server` listening only on a unix socket in a fresh temporary directory.
    pub fn start() -> Result<RedisServer> {
        Self::start_with(&[])
    }

    /// Like [`RedisServer::start`], with extra `--name value` arguments.
    pub fn start_with(extra: &[&str]) -> Result<RedisServer> {
        let dir = tempfile::Builder::new().prefix("sllm-redis-").tempdir()?;
        let socket = dir.path().join("r.sock");
        let child = Command::new("redis-server")
            .arg("--port")
            .arg("0")
            .arg("--unixsocket")
            .arg(&socket)
            .arg("--unixsocketperm")
            .arg("700")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--dir")
            .arg(dir.path())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (install it: apt-get install redis-server)")?;
        let server = RedisServer { child, dir, socket };
        server.wait_ready(Duration::from_secs(10))?;
        Ok(server)
    }

    fn wait_ready(&self, within: Duration) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < within {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        bail!("redis-server did not listen on {} within {within:?}", self.socket.display())
    }

    /// `unix://…` URL of the server.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The server's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A store on this server under a namespace no other store of this process uses.
    pub async fn store(&self) -> Result<Store> {
        self.store_with(|_| {}).await
    }

    /// Like [`RedisServer::store`], after `adjust` changed the configuration.
    pub async fn store_with(&self, adjust: impl FnOnce(&mut StoreConfig)) -> Result<Store> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let ns = format!("t{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let mut config = StoreConfig::new(self.url()).with_namespace(ns);
        adjust(&mut config);
        Ok(Store::connect(config).await?)
    }

    /// A plain redis connection, for tests that inspect or damage state by hand.
    pub async fn raw(&self) -> Result<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url())?;
        Ok(client.get_multiplexed_async_connection().await?)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
