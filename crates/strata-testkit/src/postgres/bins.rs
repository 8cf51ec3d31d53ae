//! The postgres binaries: where they are, and how they are run (as the `postgres`
//! OS user when we are root).
//!
//! Running as root (CI): postgres refuses to run as root, so `initdb` and
//! `postgres` are run as the `postgres` OS user through `setpriv` (which
//! `exec`s, so the pid we hold is the postmaster's), and the temporary
//! directory is handed to that user.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use crate::process;

/// Environment variable naming the directory holding `postgres`, `initdb`,
/// `psql` and `pg_isready`.
pub const PG_BIN_ENV: &str = "STRATA_PG_BIN";

const NOT_FOUND: &str =
    "postgres not found: install it (Debian: apt-get install postgresql) or set STRATA_PG_BIN";

const OS_USER: &str = "postgres";

/// The postgres binaries, found once per process.
#[derive(Debug)]
pub(crate) struct PgBins {
    pub(crate) postgres: PathBuf,
    pub(crate) initdb: PathBuf,
    pub(crate) psql: PathBuf,
    pub(crate) pg_isready: Option<PathBuf>,
}

impl PgBins {
    pub(crate) fn get() -> io::Result<&'static PgBins> {
        static BINS: OnceLock<Result<PgBins, String>> = OnceLock::new();
        BINS.get_or_init(Self::find)
            .as_ref()
            .map_err(|msg| io::Error::new(io::ErrorKind::NotFound, msg.clone()))
    }

    fn find() -> Result<PgBins, String> {
        let dir = Self::find_dir().ok_or_else(|| NOT_FOUND.to_owned())?;
        let in_dir_or_path = |name: &str| {
            let p = dir.join(name);
            if process::is_executable(&p) { Some(p) } else { process::which(name) }
        };
        let initdb = in_dir_or_path("initdb")
            .ok_or_else(|| format!("{NOT_FOUND} (no initdb next to {})", dir.display()))?;
        let psql = in_dir_or_path("psql")
            .ok_or_else(|| format!("{NOT_FOUND} (no psql next to {})", dir.display()))?;
        Ok(PgBins { postgres: dir.join("postgres"), initdb, psql, pg_isready: in_dir_or_path("pg_isready") })
    }

    /// `STRATA_PG_BIN`, else `pg_config --bindir`, else the newest
    /// `/usr/lib/postgresql/*/bin`, else `PATH` (following a symlink to the
    /// real directory when `initdb` is not next to it).
    fn find_dir() -> Option<PathBuf> {
        let has_postgres = |d: &Path| process::is_executable(&d.join("postgres"));
        if let Some(dir) = std::env::var_os(PG_BIN_ENV).filter(|d| !d.is_empty()) {
            // An explicit setting is used as given, even if wrong: the error
            // then names it.
            return Some(PathBuf::from(dir)).filter(|d| has_postgres(d));
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
            && out.status.success()
        {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_postgres(&dir) {
                return Some(dir);
            }
        }
        if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
            let mut versions: Vec<(u32, PathBuf)> = entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let version = e.file_name().to_str()?.split('.').next()?.parse().ok()?;
                    Some((version, e.path().join("bin")))
                })
                .filter(|(_, d)| has_postgres(d))
                .collect();
            versions.sort();
            if let Some((_, dir)) = versions.pop() {
                return Some(dir);
            }
        }
        let found = process::which("postgres")?;
        let dir = found.parent()?.to_path_buf();
        if process::is_executable(&dir.join("initdb")) {
            return Some(dir);
        }
        std::fs::canonicalize(&found).ok()?.parent().map(Path::to_path_buf)
    }
}

/// The unprivileged OS user postgres runs as when we are root.
#[derive(Debug, Clone)]
pub(crate) struct OsUser {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

pub(crate) fn os_user() -> io::Result<OsUser> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .find_map(|line| {
            let mut f = line.split(':');
            if f.next()? != OS_USER {
                return None;
            }
            let _password = f.next()?;
            let uid = f.next()?.parse().ok()?;
            let gid = f.next()?.parse().ok()?;
            Some(OsUser { uid, gid })
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "running as root, and postgres refuses to run as root, but there is no \
                 `postgres` OS user to run it as: install the postgresql package (which \
                 creates it) or `useradd --system postgres`",
            )
        })
}

/// A command running `program` directly, or as the postgres OS user when we
/// are root (`setpriv` execs, so the child pid is the program's own).
pub(crate) fn as_user(user: Option<&OsUser>, program: &Path) -> Command {
    match user {
        None => Command::new(program),
        Some(user) => {
            let mut cmd = Command::new("setpriv");
            cmd.arg(format!("--reuid={}", user.uid))
                .arg(format!("--regid={}", user.gid))
                .arg("--clear-groups")
                .arg("--")
                .arg(program)
                .env("HOME", "/tmp")
                .env("USER", OS_USER)
                .env("LOGNAME", OS_USER);
            cmd
        }
    }
}

pub(crate) fn check_output(what: &str, out: &Output) -> io::Result<()> {
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        )))
    }
}
