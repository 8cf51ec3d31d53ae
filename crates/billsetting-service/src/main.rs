//! `billsetting`: the example service. `billsetting --help` for the options.

use std::net::SocketAddr;

use anyhow::Context;
use billsetting_service::{Config, Service};
use clap::Parser;

/// The billsetting example service over Postgres and Redis.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Redis URL (tier and backplane).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    redis: String,
    /// Postgres URL.
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    database: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Accounts 1..=N created at start when missing.
    #[arg(long, default_value_t = 1000)]
    seed_accounts: i64,
    /// Bearer token for the mutating admin routes (from the environment only, so it
    /// does not show in `ps`); without it they are disabled.
    #[arg(skip = std::env::var("STRATA_ADMIN_TOKEN").ok())]
    admin_token: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("cannot install the Prometheus recorder")?;
    let config = Config {
        redis_url: args.redis,
        database_url: args.database,
        seed_accounts: args.seed_accounts,
        admin_token: args.admin_token,
        prometheus: Some(prometheus),
    };
    let service = Service::start(&config).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "billsetting listening");
    axum::serve(listener, service.router().into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    service.shutdown().await;
    Ok(())
}
