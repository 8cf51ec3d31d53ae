//! `strata`: the command-line tool of the strata cache.
//!
//! `strata bench` runs the seed stories (see `strata bench --help`) against several
//! caching strategies side by side. `strata check` is a consistency torture run: a
//! fleet of processes under faults, a recorded history and a checker (see
//! `strata check --help`). `strata invalidate` invalidates keys, a tag or a namespace after
//! manual DML, through the library's own tier and backplane; `strata stats` shows what
//! Redis holds for a namespace.

mod bench;
mod check;
mod ops;
mod secret;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The strata command line.
#[derive(Debug, Parser)]
#[command(name = "strata", version, about = "Tools for the strata multi-tier cache")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Run a seed scenario against several caching strategies, side by side.
    // A variant's doc comment would replace the long help `BenchArgs` carries: restate it.
    #[command(long_about = bench::LONG_ABOUT, after_long_help = bench::AFTER_LONG_HELP)]
    Bench(Box<bench::BenchArgs>),
    /// Consistency torture run: a fleet under faults, a recorded history, a checker.
    Check(check::CheckArgs),
    /// Invalidate keys, a tag or a whole namespace across a running fleet (after manual DML).
    Invalidate(ops::invalidate::InvalidateArgs),
    /// Show what Redis holds for a namespace: epochs, entries, the backplane stream.
    Stats(ops::stats::StatsArgs),
    /// A namespace's write-behind queue: what waits, the dead letters, requeue them.
    WriteBehind(ops::write_behind::WriteBehindArgs),
    /// One instance of a `strata check` fleet (started by `strata check`).
    #[command(hide = true)]
    CheckWorker(check::worker::WorkerArgs),
    /// One instance of a `strata check --workload drafts` fleet.
    #[command(hide = true)]
    CheckDraftsWorker(check::drafts::worker::DraftsWorkerArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Silent unless asked: a fault run logs a warning per gap and timeout, which would
    // bury the tables. `RUST_LOG=strata=warn,strata_redis=warn` shows them.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .init();
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // As `main` returning the error would print it, with every secret of the
            // URLs given replaced: error chains may quote text from client libraries.
            eprintln!("Error: {}", secret::scrub(&format!("{e:?}")));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the tokio runtime: {e}"))?;
    match cli.command {
        Command::Bench(args) => runtime.block_on(bench::run(*args)),
        Command::Check(args) => runtime.block_on(check::run(args)),
        Command::Invalidate(args) => runtime.block_on(ops::invalidate::run(args)),
        Command::Stats(args) => runtime.block_on(ops::stats::run(args)),
        Command::WriteBehind(args) => runtime.block_on(ops::write_behind::run(args)),
        Command::CheckWorker(args) => runtime.block_on(check::worker::run(args)),
        Command::CheckDraftsWorker(args) => runtime.block_on(check::drafts::worker::run(args)),
    }
}
