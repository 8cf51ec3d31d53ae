//! A real `redis-server` process on a random loopback port.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::process::{self, Proc, StartError};

/// Environment variable naming the `redis-server` binary to use instead of the
/// one found in `PATH`.
pub const REDIS_SERVER_ENV: &str = "STRATA_REDIS_SERVER";

const NOT_FOUND: &str =
    "redis-server not found: install it (Debian: apt-get install redis-server) or set STRATA_REDIS_SERVER";

/// How many fresh random ports [`RedisServerBuilder::try_start`] tries when the
/// one it picked was taken in the meantime.
const PORT_ATTEMPTS: usize = 5;

/// How long [`RedisServer::restart`] keeps retrying while the old port is
/// still in use.
const RESTART_RETRY: Duration = Duration::from_secs(5);

/// Default timeout of [`RedisServer::command`].
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Builder for a [`RedisServer`] with extra configuration.
///
/// ```no_run
/// let redis = strata_testkit::RedisServer::builder()
///     .arg("client-output-buffer-limit", "pubsub 1kb 1kb 0")
///     .start();
/// println!("{}", redis.url());
/// ```
#[derive(Debug, Clone)]
pub struct RedisServerBuilder {
    args: Vec<(String, String)>,
    startup_timeout: Duration,
    /// Pick a port whose cluster bus port (+10000) is free too.
    pub(crate) cluster_bus: bool,
    /// SIGKILL the server when the thread that (re)starts it exits.
    pub(crate) die_with_parent: bool,
}

impl Default for RedisServerBuilder {
    fn default() -> Self {
        Self {
            args: Vec::new(),
            startup_timeout: Duration::from_secs(10),
            cluster_bus: false,
            die_with_parent: false,
        }
    }
}

impl RedisServerBuilder {
    /// Adds one configuration directive, written verbatim as the line
    /// `name value` of the server's `redis.conf` (so multi-word values such as
    /// `"pubsub 1kb 1kb 0"` work as they would in a config file; an empty
    /// value is written as `""`). Later directives override earlier ones and
    /// the defaults (port, bind, dir, logfile, `save ""`, `appendonly no`,
    /// `protected-mode no`) — do not override `port`.
    #[must_use]
    pub fn arg(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.args.push((name.into(), value.into()));
        self
    }

    /// How long to wait for the server to answer `PING` (default 10 s).
    #[must_use]
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Starts the server and waits until it answers `PING`.
    ///
    /// # Panics
    ///
    /// When the server cannot be started: `redis-server` is missing, it exits
    /// at once, or it does not answer within the startup timeout (the panic
    /// message then contains the server's log). In a test, that means the test
    /// environment is broken.
    pub fn start(self) -> RedisServer {
        self.try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`start`](Self::start) but returns the error instead of panicking.
    ///
    /// # Errors
    ///
    /// `NotFound` if the binary is missing; otherwise an error whose message
    /// includes the server's log.
    pub fn try_start(self) -> io::Result<RedisServer> {
        let bin = redis_binary();
        let dir = tempfile::Builder::new().prefix("strata-redis-").tempdir()?;
        let mut server = RedisServer {
            bin,
            conf: dir.path().join("redis.conf"),
            log_path: dir.path().join("redis.log"),
            stdio_path: dir.path().join("redis.stdio.log"),
            args: self.args,
            startup_timeout: self.startup_timeout,
            die_with_parent: self.die_with_parent,
            port: 0,
            proc: None,
            dir,
        };
        let pick = if self.cluster_bus { process::free_port_pair } else { process::free_port };
        process::start_on_port_from("redis-server", PORT_ATTEMPTS, pick, |port| {
            server.port = port;
            server.spawn_and_wait()
        })?;
        Ok(server)
    }
}

/// A real `redis-server` process listening on a random port of 127.0.0.1, with
/// its own temporary directory (config, log; no persistence).
///
/// The process is killed (SIGKILL) when this value is dropped. If the thread
/// is panicking at that moment (a failing test), the last 50 lines of the
/// server log are printed to stderr.
#[derive(Debug)]
pub struct RedisServer {
    bin: PathBuf,
    conf: PathBuf,
    log_path: PathBuf,
    stdio_path: PathBuf,
    args: Vec<(String, String)>,
    startup_timeout: Duration,
    die_with_parent: bool,
    port: u16,
    proc: Option<Proc>,
    // Dropped last (fields drop in declaration order, after `Drop::drop`).
    dir: TempDir,
}

impl RedisServer {
    /// Starts a server with the default configuration.
    ///
    /// # Panics
    ///
    /// See [`RedisServerBuilder::start`].
    pub fn start() -> Self {
        Self::builder().start()
    }

    /// A builder for extra configuration directives.
    pub fn builder() -> RedisServerBuilder {
        RedisServerBuilder::default()
    }

    /// The TCP port on 127.0.0.1. It stays the same across
    /// [`restart`](Self::restart).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port))
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The server's temporary directory (its `dir`, config and log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The pid of the current server process, if one was started and not
    /// killed.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Whether the server process is alive (a paused server counts as
    /// running).
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_running)
    }

    /// Kills the server with SIGKILL and waits for it to exit. No-op when it
    /// is not running.
    pub fn kill(&mut self) {
        process::kill(&mut self.proc);
    }

    /// Freezes the server with SIGSTOP: connections stay open and new ones
    /// are still accepted by the kernel, but nothing is answered.
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
        process::signal(self.proc.as_mut(), "redis-server", sig)
    }

    /// Starts the server again on the same port (killing it first if it is
    /// still running) and waits until it answers `PING`. Retries for a few
    /// seconds while the port is still in use. The data set is empty
    /// afterwards (no persistence).
    ///
    /// # Panics
    ///
    /// When the server cannot be started again (the message contains the
    /// log); in a test that means the environment is broken.
    pub fn restart(&mut self) {
        self.try_restart().unwrap_or_else(|e| panic!("{e}"));
    }

    /// Like [`restart`](Self::restart) but returns the error.
    ///
    /// # Errors
    ///
    /// When the server does not come up; the message includes the log.
    pub fn try_restart(&mut self) -> io::Result<()> {
        self.kill();
        process::retry_start(RESTART_RETRY, process::port_in_use, || self.spawn_and_wait())
    }

    /// The server log (its `logfile`, followed by anything it printed to
    /// stdout/stderr before the log file was opened).
    pub fn log(&self) -> String {
        let mut log = process::read_lossy(&self.log_path);
        let stdio = process::read_lossy(&self.stdio_path);
        if !stdio.trim().is_empty() {
            log.push_str("---- redis-server stdout/stderr ----\n");
            log.push_str(&stdio);
        }
        log
    }

    /// Sends one command (e.g. `&["CONFIG", "GET", "maxmemory"]`) on a fresh
    /// connection and returns the raw RESP reply as text, e.g. `+OK\r\n`,
    /// `:0\r\n` or `$5\r\nhello\r\n`. Times out after 5 s.
    ///
    /// # Errors
    ///
    /// I/O errors and timeouts; an error reply (`-ERR ...`) is returned as an
    /// error of kind `Other` carrying the message.
    pub fn command(&self, args: &[&str]) -> io::Result<String> {
        self.command_timeout(args, COMMAND_TIMEOUT)
    }

    /// [`command`](Self::command) with an explicit connect/read/write timeout
    /// (e.g. to check that a paused server does not answer).
    ///
    /// # Errors
    ///
    /// As [`command`](Self::command); a timeout is `WouldBlock`/`TimedOut`.
    pub fn command_timeout(&self, args: &[&str], timeout: Duration) -> io::Result<String> {
        resp_command(self.addr(), args, timeout)
    }

    /// Sends `PING` and checks for `+PONG`, with the given timeout.
    ///
    /// # Errors
    ///
    /// I/O errors, timeouts, or an unexpected reply.
    pub fn ping(&self, timeout: Duration) -> io::Result<()> {
        ping(self.addr(), timeout)
    }

    fn spawn_and_wait(&mut self) -> Result<(), StartError> {
        self.write_conf().map_err(StartError::Other)?;
        let log_offset = std::fs::metadata(&self.log_path).map_or(0, |m| m.len());
        let stdio_offset = std::fs::metadata(&self.stdio_path).map_or(0, |m| m.len());
        let stdio =
            OpenOptions::new().create(true).append(true).open(&self.stdio_path).map_err(StartError::Other)?;
        let stdio_err = stdio.try_clone().map_err(StartError::Other)?;
        let mut command = Command::new(&self.bin);
        if self.die_with_parent {
            crate::sys::die_with_parent(&mut command);
        }
        let child = command
            .arg(&self.conf)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(stdio)
            .stderr(stdio_err)
            .spawn()
            .map_err(|e| {
                StartError::Other(if e.kind() == io::ErrorKind::NotFound {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{NOT_FOUND} (tried {})", self.bin.display()),
                    )
                } else {
                    io::Error::new(e.kind(), format!("cannot run {}: {e}", self.bin.display()))
                })
            })?;
        let mut proc = Proc::new(child, false);
        let deadline = Instant::now() + self.startup_timeout;
        loop {
            if let Some(status) = proc.exit_status() {
                let new_log = format!(
                    "{}{}",
                    read_from(&self.log_path, log_offset),
                    read_from(&self.stdio_path, stdio_offset)
                );
                let err = io::Error::other(format!(
                    "redis-server on port {} exited at startup ({status}); log:\n{}",
                    self.port,
                    self.log()
                ));
                return Err(if new_log.contains("Address already in use") {
                    StartError::PortInUse(err)
                } else {
                    StartError::Other(err)
                });
            }
            if ping(self.addr(), Duration::from_millis(250)).is_ok() {
                self.proc = Some(proc);
                return Ok(());
            }
            if Instant::now() >= deadline {
                proc.kill();
                return Err(StartError::Other(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "redis-server on port {} did not answer PING within {:?}; log:\n{}",
                        self.port,
                        self.startup_timeout,
                        self.log()
                    ),
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn write_conf(&self) -> io::Result<()> {
        let dir = self.dir.path();
        let mut conf = String::new();
        // `dir` and `logfile` are quoted: temp paths contain no quotes.
        let _ = writeln!(conf, "port {}", self.port);
        let _ = writeln!(conf, "bind 127.0.0.1");
        let _ = writeln!(conf, "protected-mode no");
        let _ = writeln!(conf, "daemonize no");
        let _ = writeln!(conf, "dir \"{}\"", dir.display());
        let _ = writeln!(conf, "logfile \"{}\"", self.log_path.display());
        let _ = writeln!(conf, "save \"\"");
        let _ = writeln!(conf, "appendonly no");
        for (name, value) in &self.args {
            if value.is_empty() {
                let _ = writeln!(conf, "{name} \"\"");
            } else {
                let _ = writeln!(conf, "{name} {value}");
            }
        }
        File::create(&self.conf)?.write_all(conf.as_bytes())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            process::dump_log_tail(&format!("redis-server 127.0.0.1:{}", self.port), &self.log());
        }
        self.kill();
    }
}

fn redis_binary() -> PathBuf {
    match std::env::var_os(REDIS_SERVER_ENV) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => process::which("redis-server").unwrap_or_else(|| PathBuf::from("redis-server")),
    }
}

fn read_from(path: &Path, offset: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset).unwrap_or(usize::MAX).min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

fn ping(addr: SocketAddr, timeout: Duration) -> io::Result<()> {
    let reply = resp_command(addr, &["PING"], timeout)?;
    if reply.starts_with("+PONG") {
        Ok(())
    } else {
        Err(io::Error::other(format!("unexpected PING reply {reply:?}")))
    }
}

/// Sends one RESP command on a fresh connection and reads one complete reply.
pub(crate) fn resp_command(addr: SocketAddr, args: &[&str], timeout: Duration) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    stream.write_all(&encode_command(args))?;
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = resp_value_len(&buf) {
            buf.truncate(end);
            break;
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "redis reply timed out"));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "redis closed the connection before a complete reply",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    if let Some(msg) = text.strip_prefix('-') {
        return Err(io::Error::other(msg.trim_end().to_owned()));
    }
    Ok(text)
}

/// Encodes a command as a RESP array of bulk strings.
pub(crate) fn encode_command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Length of the first complete RESP (2 or 3) value in `buf`, if complete.
pub(crate) fn resp_value_len(buf: &[u8]) -> Option<usize> {
    value_end(buf, 0)
}

fn value_end(buf: &[u8], pos: usize) -> Option<usize> {
    let kind = *buf.get(pos)?;
    let line_end = buf[pos..].windows(2).position(|w| w == b"\r\n")? + pos;
    let after_line = line_end + 2;
    let header = std::str::from_utf8(&buf[pos + 1..line_end]).ok();
    let count = || header.and_then(|h| h.parse::<i64>().ok());
    match kind {
        b'$' | b'!' | b'=' => {
            let len = count()?;
            if len < 0 {
                return Some(after_line);
            }
            let end = after_line + usize::try_from(len).ok()? + 2;
            (buf.len() >= end).then_some(end)
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let n = count()?;
            if n < 0 {
                return Some(after_line);
            }
            let n = usize::try_from(n).ok()?;
            let n = if matches!(kind, b'%' | b'|') { n * 2 } else { n };
            let mut p = after_line;
            for _ in 0..n {
                p = value_end(buf, p)?;
            }
            // A RESP3 attribute map is followed by the value it describes.
            if kind == b'|' {
                p = value_end(buf, p)?;
            }
            Some(p)
        }
        _ => Some(after_line),
    }
}
