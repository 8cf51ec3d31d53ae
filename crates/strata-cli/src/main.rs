//! `strata`: the command-line tool of the strata cache.
//!
//! `strata bench` runs the seed stories (see `strata bench --help`) against several
//! caching strategies side by side. Planned: `check` (a consistency torture run with
//! faults and a history checker), `invalidate` (ops command for manual DML) and `stats`.

mod bench;

use clap::{Parser, Subcommand};

/// The strata command line.
#[derive(Debug, Parser)]
#[command(name = "strata", version, about = "Tools for the strata multi-tier cache")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The subcommands. `check`, `invalidate` and `stats` will join `bench` here.
#[derive(Debug, Subcommand)]
enum Command {
    /// Run a seed scenario against several caching strategies, side by side.
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the tokio runtime: {e}"))?;
    match cli.command {
        Command::Bench(args) => runtime.block_on(bench::run(args)),
    }
}
