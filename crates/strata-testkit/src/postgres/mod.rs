//! A real `postgres` server in a temporary directory on a random loopback port.
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | the server: builder, start, restart, signals, `psql` |
//! | `bins.rs` | the binaries, found once, and running them as the `postgres` OS user |
//! | `data_dir.rs` | `initdb`, and the cached template data directory copied instead |

mod bins;
mod data_dir;

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use self::bins::{OsUser, PgBins, as_user, check_output, os_user};
use self::data_dir::init_data_dir;
use crate::process::{self, Proc, StartError};
use crate::sys;

pub use self::bins::PG_BIN_ENV;
pub use self::data_dir::PG_NO_TEMPLATE_ENV;

const PORT_ATTEMPTS: usize = 5;
const RESTART_RETRY: Duration = Duration::from_secs(10);

/// Builder for a [`PostgresServer`] with extra server settings.
#[derive(Debug, Clone)]
pub struct PostgresServerBuilder {
    settings: Vec<(String, String)>,
    startup_timeout: Duration,
}

impl Default for PostgresServerBuilder {
    fn default() -> Self {
        Self { settings: Vec::new(), startup_timeout: Duration::from_secs(30) }
    }
}

impl PostgresServerBuilder {
    /// Adds a server setting, passed as `-c name=value` after the defaults
    /// (`listen_addresses=127.0.0.1`, `fsync=off`, `full_page_writes=off`), e.g.
    /// `.setting("max_connections", "300")`.
    #[must_use]
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// How long to wait until the server accepts connections (default 30 s).
    #[must_use]
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Creates the data directory, starts the server and waits until it
    /// accepts connections.
    ///
    /// # Panics
    ///
    /// When the server cannot be started (binaries missing, `initdb` failing,
    /// startup timeout — the message contains the log). In a test, that means
    /// the test environment is broken.
    pub fn start(self) -> PostgresServer {
        self.try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`start`](Self::start) but returns the error.
    ///
    /// # Errors
    ///
    /// `NotFound` if the binaries are missing; otherwise an error describing
    /// the failed step with its output or the server log.
    pub fn try_start(self) -> io::Result<PostgresServer> {
        let bins = PgBins::get()?;
        let user = if sys::is_root() { Some(os_user()?) } else { None };
        let dir = tempfile::Builder::new().prefix("strata-pg-").tempdir()?;
        if let Some(user) = &user {
            std::os::unix::fs::chown(dir.path(), Some(user.uid), Some(user.gid))?;
        }
        let data = dir.path().join("data");
        init_data_dir(bins, user.as_ref(), dir.path(), &data)?;
        let mut server = PostgresServer {
            bins,
            user,
            data,
            log_path: dir.path().join("postgres.log"),
            settings: self.settings,
            startup_timeout: self.startup_timeout,
            port: 0,
            proc: None,
            dir,
        };
        process::start_on_free_port("postgres", PORT_ATTEMPTS, |port| {
            server.port = port;
            server.spawn_and_wait()
        })?;
        Ok(server)
    }
}

/// A real `postgres` server listening on a random port of 127.0.0.1 with a
/// fresh data directory in a temporary directory (`trust` authentication,
/// superuser `postgres`, durability settings off for speed).
///
/// The server runs as the leader of its own process group; [`kill`](Self::kill),
/// [`pause`](Self::pause) and [`resume`](Self::resume) signal the whole group
/// (postmaster and backends). It is killed when this value is dropped; if the
/// thread is panicking then, the last 50 log lines are printed to stderr.
#[derive(Debug)]
pub struct PostgresServer {
    bins: &'static PgBins,
    user: Option<OsUser>,
    data: PathBuf,
    log_path: PathBuf,
    settings: Vec<(String, String)>,
    startup_timeout: Duration,
    port: u16,
    proc: Option<Proc>,
    // Dropped last (fields drop in declaration order, after `Drop::drop`).
    dir: TempDir,
}

impl PostgresServer {
    /// Starts a server with the default settings.
    ///
    /// # Panics
    ///
    /// See [`PostgresServerBuilder::start`].
    pub fn start() -> Self {
        Self::builder().start()
    }

    /// A builder for extra settings.
    pub fn builder() -> PostgresServerBuilder {
        PostgresServerBuilder::default()
    }

    /// The TCP port on 127.0.0.1 (the same across [`restart`](Self::restart)).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port))
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// `postgres://postgres@127.0.0.1:PORT/DATABASE` (the name percent-encoded).
    pub fn url_for(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, percent_encode(database))
    }

    /// The temporary directory (data directory `data/`, Unix socket, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The postmaster's pid, if started and not killed.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Whether the postmaster is alive (a paused server counts as running).
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_running)
    }

    /// SIGKILLs the postmaster and all backends and waits for the postmaster.
    /// No-op when not running. A [`restart`](Self::restart) then goes through
    /// crash recovery.
    pub fn kill(&mut self) {
        process::kill(&mut self.proc);
    }

    /// Freezes the postmaster and all backends with SIGSTOP: connections stay
    /// open, queries and new connections hang.
    ///
    /// # Errors
    ///
    /// If the server is not running or the signal cannot be sent.
    pub fn pause(&mut self) -> io::Result<()> {
        self.signal(libc::SIGSTOP)
    }

    /// Resumes a [`pause`](Self::pause)d server with SIGCONT.
    ///
    /// # Errors
    ///
    /// If the server is not running or the signal cannot be sent.
    pub fn resume(&mut self) -> io::Result<()> {
        self.signal(libc::SIGCONT)
    }

    fn signal(&mut self, sig: libc::c_int) -> io::Result<()> {
        process::signal(self.proc.as_mut(), "postgres", sig)
    }

    /// Starts the server again on the same port and data directory (killing
    /// it first if running), waiting until it accepts connections. Data
    /// committed before a kill survives (crash recovery), although with
    /// `fsync=off` only because the OS did not crash.
    ///
    /// # Panics
    ///
    /// When the server does not come back (the message contains the log).
    pub fn restart(&mut self) {
        self.try_restart().unwrap_or_else(|e| panic!("{e}"));
    }

    /// Like [`restart`](Self::restart) but returns the error.
    ///
    /// # Errors
    ///
    /// When the server does not come back; the message includes the log.
    pub fn try_restart(&mut self) -> io::Result<()> {
        self.kill();
        // Killed backends may hold the port or the old shared memory for
        // a moment: retry any early exit until the deadline.
        process::retry_start(RESTART_RETRY, process::not_timed_out, || self.spawn_and_wait())
    }

    /// The server log (its stderr).
    pub fn log(&self) -> String {
        process::read_lossy(&self.log_path)
    }

    /// Runs `sql` with `psql` against `database` (unaligned, tuples only:
    /// `select 1` gives `"1\n"`) and returns its stdout.
    ///
    /// # Errors
    ///
    /// If `psql` cannot be run or fails (the message contains its stderr).
    pub fn psql(&self, database: &str, sql: &str) -> io::Result<String> {
        let out = Command::new(&self.bins.psql)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres"])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(database)
            .arg("-c")
            .arg(sql)
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot run psql: {e}")))?;
        check_output("psql", &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Checks that the server answers, without `psql`: opens a TCP
    /// connection, sends an `SSLRequest` and waits for the one-byte answer
    /// (`N` or `S`). Cheap enough to poll; a paused server fails it.
    ///
    /// # Errors
    ///
    /// I/O errors, a timeout (`WouldBlock`/`TimedOut`), or an unexpected
    /// answer.
    pub fn ping(&self, timeout: Duration) -> io::Result<()> {
        let mut stream = TcpStream::connect_timeout(&self.addr(), timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        // Int32 length 8, Int32 code 80877103 (SSLRequest).
        stream.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])?;
        let mut answer = [0u8; 1];
        stream.read_exact(&mut answer)?;
        match answer[0] {
            b'N' | b'S' => Ok(()),
            other => Err(io::Error::other(format!("unexpected answer {other:#04x} to SSLRequest"))),
        }
    }

    /// Creates a database and returns its URL (see [`url_for`](Self::url_for)).
    ///
    /// # Errors
    ///
    /// If `CREATE DATABASE` fails (e.g. it exists already).
    pub fn create_database(&self, name: &str) -> io::Result<String> {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        self.psql("postgres", &format!("CREATE DATABASE {quoted}"))?;
        Ok(self.url_for(name))
    }

    fn spawn_and_wait(&mut self) -> Result<(), StartError> {
        let log_offset = std::fs::metadata(&self.log_path).map_or(0, |m| m.len());
        let log =
            OpenOptions::new().create(true).append(true).open(&self.log_path).map_err(StartError::Other)?;
        let log_err = log.try_clone().map_err(StartError::Other)?;
        let mut cmd = as_user(self.user.as_ref(), &self.bins.postgres);
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                // synchronous_commit stays on: with it off a commit may return while its
                // WAL is still in shared memory, and a kill -9 then loses it, which would
                // break `restart`'s promise. With fsync off it costs one write() per commit.
                "-c",
                "full_page_writes=off",
            ]);
        for (name, value) in &self.settings {
            cmd.arg("-c").arg(format!("{name}={value}"));
        }
        let child = cmd
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .map_err(|e| {
                StartError::Other(io::Error::new(
                    e.kind(),
                    format!("cannot run {}: {e}", self.bins.postgres.display()),
                ))
            })?;
        let mut proc = Proc::new(child, true);
        let deadline = Instant::now() + self.startup_timeout;
        loop {
            if let Some(status) = proc.exit_status() {
                proc.kill(); // reap the rest of the group, if any
                let log = self.log();
                let new_log = log.get(usize::try_from(log_offset).unwrap_or(0)..).unwrap_or("");
                let err = io::Error::other(format!(
                    "postgres on port {} exited at startup ({status}); log:\n{log}",
                    self.port
                ));
                return Err(if new_log.contains("Address already in use") {
                    StartError::PortInUse(err)
                } else {
                    StartError::Other(err)
                });
            }
            if self.ready() {
                self.proc = Some(proc);
                return Ok(());
            }
            if Instant::now() >= deadline {
                proc.kill();
                return Err(StartError::Other(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "postgres on port {} not ready within {:?}; log:\n{}",
                        self.port,
                        self.startup_timeout,
                        self.log()
                    ),
                )));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `pg_isready` if available, else a plain TCP connect.
    fn ready(&self) -> bool {
        match &self.bins.pg_isready {
            Some(pg_isready) => Command::new(pg_isready)
                .args(["-q", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-t", "1"])
                .arg("-p")
                .arg(self.port.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            None => TcpStream::connect_timeout(&self.addr(), Duration::from_millis(250)).is_ok(),
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            process::dump_log_tail(&format!("postgres 127.0.0.1:{}", self.port), &self.log());
        }
        self.kill();
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
