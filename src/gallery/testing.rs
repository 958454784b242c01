//! A throwaway PostgreSQL cluster for tests and benchmarks: Debian's
//! `postgresql-15` binaries, a data folder in the temp dir, a loopback port,
//! run as the `postgres` user when we are root (initdb refuses root), with
//! TLS on (a throwaway CA and a certificate for 127.0.0.1) beside plain
//! connections. Not used by the service itself.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Where Debian's package puts the server binaries.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct TestCluster {
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl TestCluster {
    /// The cluster shared by every test of this process, started on first use
    /// and stopped by a watchdog when the process exits (even on a panic or
    /// `kill -9`, which no destructor would survive).
    pub fn shared() -> &'static TestCluster {
        static SHARED: OnceLock<TestCluster> = OnceLock::new();
        SHARED.get_or_init(|| {
            let c = TestCluster::start().unwrap_or_else(|e| panic!("{e:#}"));
            c.watch_parent();
            c
        })
    }

    /// initdb + start. Fails, naming the make target, when PostgreSQL 15 is
    /// not installed: a test that needs it must never pass without it.
    pub fn start() -> anyhow::Result<TestCluster> {
        let bin = Path::new(PG_BIN);
        if !bin.join("initdb").exists() {
            bail!(
                "PostgreSQL 15 is not installed ({PG_BIN}/initdb missing): run `make postgres` \
                 (`make test` does) to install Debian's postgresql-15"
            );
        }
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mobiface-pg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let as_postgres = is_root();
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").context("picking a free port")?;
            l.local_addr()?.port()
        };
        let cluster = TestCluster {
            dir,
            port,
            as_postgres,
        };
        cluster.run("mkdir", &["-p", "-m", "0700", &cluster.data()])?;
        cluster.run(
            &format!("{PG_BIN}/initdb"),
            &[
                "-D",
                &cluster.data(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        )?;
        cluster.make_certificates()?;
        cluster.start_server()?;
        Ok(cluster)
    }

    /// A CA (`ca_file`) and a server certificate it signed for 127.0.0.1 and
    /// localhost, made with the `openssl` tool that Debian's PostgreSQL
    /// packages depend on.
    fn make_certificates(&self) -> anyhow::Result<()> {
        let (dir, data) = (self.dir.display().to_string(), self.data());
        let (ca_key, ca) = (format!("{dir}/ca.key"), format!("{dir}/ca.crt"));
        let (key, csr, crt) = (
            format!("{data}/server.key"),
            format!("{dir}/server.csr"),
            format!("{data}/server.crt"),
        );
        #[rustfmt::skip]
        let steps: [&[&str]; 3] = [
            &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
              "-subj", "/CN=mobiface test CA", "-keyout", &ca_key, "-out", &ca],
            &["req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
              "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", &key, "-out", &csr],
            &["x509", "-req", "-in", &csr, "-CA", &ca, "-CAkey", &ca_key, "-CAcreateserial",
              "-days", "2", "-copy_extensions", "copyall", "-out", &crt],
        ];
        for args in steps {
            self.run("openssl", args)?;
        }
        // PostgreSQL refuses a key that others may read.
        self.run("chmod", &["0600", &key])
    }

    /// The CA that signed the server's certificate: `sslrootcert` for TLS.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// Runs a command, as `postgres` when we are root.
    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", program]);
            c
        } else {
            Command::new(program)
        };
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Starts (or restarts) the server and waits until it accepts connections.
    pub fn start_server(&self) -> anyhow::Result<()> {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c max_connections=200 -c ssl=on \
             -c ssl_cert_file=server.crt -c ssl_key_file=server.key",
            self.port,
            self.data()
        );
        let log = self.dir.join("data/server.log").display().to_string();
        self.run(
            &format!("{PG_BIN}/pg_ctl"),
            &[
                "-D",
                &self.data(),
                "-o",
                &opts,
                "-l",
                &log,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                bail!("PostgreSQL did not listen on port {}", self.port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops the server (fast shutdown: sessions are cut, as in a failover).
    pub fn stop_server(&self) -> anyhow::Result<()> {
        self.run(
            &format!("{PG_BIN}/pg_ctl"),
            &["-D", &self.data(), "-m", "fast", "-w", "stop"],
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A fresh, empty database on this cluster, named uniquely; returns its URL.
    pub fn create_database(&self, prefix: &str) -> anyhow::Result<String> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "{prefix}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        self.run(
            &format!("{PG_BIN}/createdb"),
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                &name,
            ],
        )?;
        Ok(self.url(&name))
    }

    /// A shell that stops the cluster and removes its folder once this
    /// process is gone.
    fn watch_parent(&self) {
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             {stop} {PG_BIN}/pg_ctl -D {data} -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            stop = if self.as_postgres {
                "runuser -u postgres --"
            } else {
                ""
            },
            data = self.data(),
            dir = self.dir.display(),
        );
        let _ = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let _ = self.run(
            &format!("{PG_BIN}/pg_ctl"),
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
