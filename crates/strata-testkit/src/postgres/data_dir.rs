//! The data directory of a new server: `initdb`, or a copy of a cached template.
//!
//! Startup: `initdb` is slow (about a second), so the first server of a
//! machine runs `initdb` once into a *template* data directory cached under
//! `$TMPDIR/strata-testkit/` (keyed by postgres version and effective uid;
//! built in a scratch directory and renamed into place, so concurrent test
//! processes never see a half-written template), and every server copies it
//! with `cp -a` (~0.1 s). Set `STRATA_PG_NO_TEMPLATE=1` to run `initdb` per
//! server instead; if building or copying the template fails, `initdb` is run
//! per server as well.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use super::bins::{OsUser, PgBins, as_user, check_output};
use crate::sys;

/// Environment variable that, when set to a non-empty value other than `0`,
/// disables the cached `initdb` template.
pub const PG_NO_TEMPLATE_ENV: &str = "STRATA_PG_NO_TEMPLATE";

/// Bump when the `initdb` arguments change, to invalidate cached templates.
const TEMPLATE_FORMAT: u32 = 1;

/// Runs `initdb` into `data` (which must not exist; `parent` must be writable
/// by the server user).
fn run_initdb(bins: &PgBins, user: Option<&OsUser>, parent: &Path, data: &Path) -> io::Result<()> {
    let out = as_user(user, &bins.initdb)
        .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C", "-D"])
        .arg(data)
        .current_dir(parent)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run initdb: {e}")))?;
    check_output("initdb", &out)
}

pub(crate) fn init_data_dir(
    bins: &PgBins,
    user: Option<&OsUser>,
    parent: &Path,
    data: &Path,
) -> io::Result<()> {
    if let Some(template) = template(bins, user) {
        let copied = Command::new("cp").arg("-a").arg(template).arg(data).stdin(Stdio::null()).output();
        if copied.is_ok_and(|o| o.status.success()) {
            return Ok(());
        }
        let _ = std::fs::remove_dir_all(data);
    }
    run_initdb(bins, user, parent, data)
}

/// The cached template data directory, built on first use (see module docs).
fn template(bins: &PgBins, user: Option<&OsUser>) -> Option<&'static Path> {
    static TEMPLATE: OnceLock<Option<PathBuf>> = OnceLock::new();
    let disabled = std::env::var(PG_NO_TEMPLATE_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
    if disabled {
        return None;
    }
    TEMPLATE.get_or_init(|| build_template(bins, user).ok()).as_deref()
}

fn build_template(bins: &PgBins, user: Option<&OsUser>) -> io::Result<PathBuf> {
    let version = Command::new(&bins.postgres).arg("--version").output()?;
    check_output("postgres --version", &version)?;
    let version: String = String::from_utf8_lossy(&version.stdout)
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '_' })
        .collect();
    let cache = std::env::temp_dir().join("strata-testkit");
    std::fs::create_dir_all(&cache)?;
    let euid = sys::euid();
    let final_dir = cache.join(format!("pg-template-{version}-uid{euid}-v{TEMPLATE_FORMAT}"));
    if final_dir.join("PG_VERSION").is_file() {
        return Ok(final_dir);
    }
    let scratch = tempfile::Builder::new().prefix("pg-build-").tempdir_in(&cache)?;
    if let Some(user) = user {
        std::os::unix::fs::chown(scratch.path(), Some(user.uid), Some(user.gid))?;
    }
    let data = scratch.path().join("data");
    run_initdb(bins, user, scratch.path(), &data)?;
    // Atomic publish; if another process won the race, use its template.
    if std::fs::rename(&data, &final_dir).is_err() && !final_dir.join("PG_VERSION").is_file() {
        return Err(io::Error::other("cannot publish the postgres template"));
    }
    Ok(final_dir)
}
