//! The `sluice` command: parse the command line, set up logging, call into the library.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use sluice::config::{Config, EndpointConfig, DEFAULT_PATH};
use sluice::telemetry::{self, LogFormat};
use sluice::{app, demo, healthcheck, App};

/// A rate-limiting reverse proxy for ML scoring APIs.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log line format [default: text on a terminal, json otherwise]; filter with SLUICE_LOG.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with the given config.
    Run(RunArgs),
    /// Validate a config and print a one-line summary; exit 1 listing every problem.
    Check(ConfigArg),
    /// Start demo scoring endpoints on 127.0.0.1 and the proxy in front of them.
    Demo(DemoArgs),
    /// Exit 0 when `/readyz` on the config's admin listener answers 200 (ready or degraded),
    /// 1 otherwise with the reason on stderr; for container HEALTHCHECKs.
    Healthcheck(HealthcheckArgs),
    /// Serve only demo scoring endpoints, on consecutive ports (a backend for `run`, e.g. in a
    /// container); stop on SIGTERM/SIGINT.
    DemoEndpoints(DemoEndpointsArgs),
}

#[derive(Args)]
struct ConfigArg {
    /// Config file.
    #[arg(long, env = "SLUICE_CONFIG", default_value = DEFAULT_PATH)]
    config: PathBuf,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Runtime worker threads [default: one per CPU core].
    #[arg(long)]
    workers: Option<usize>,
}

#[derive(Args)]
struct HealthcheckArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Give up (not ready) after this long, e.g. "3s".
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Args)]
struct DemoArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Number of demo endpoints.
    #[arg(long, default_value_t = 3)]
    endpoints: usize,
    /// Latency of each demo answer, e.g. "50ms".
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    latency: Duration,
}

#[derive(Args)]
struct DemoEndpointsArgs {
    /// Address of the first endpoint; the others take the next ports (port 0: each takes any
    /// free port). The default matches the endpoints of the shipped config/sluice.toml.
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// Number of endpoints.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    count: u16,
    /// Latency of each answer, e.g. "50ms".
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    latency: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check(arg) => check(&arg.config),
        Command::Run(args) => serve(&args, cli.log_format, None),
        Command::Demo(args) => serve(
            &args.run,
            cli.log_format,
            Some((args.endpoints, args.latency)),
        ),
        Command::Healthcheck(args) => healthcheck(&args),
        Command::DemoEndpoints(args) => block_on(cli.log_format, None, demo_endpoints_only(&args)),
    }
}

fn check(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            println!("{}: ok: {}", path.display(), config.summary());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// No logging and a one-thread runtime: a check every few seconds must stay cheap and print
/// only its verdict.
fn healthcheck(args: &HealthcheckArgs) -> ExitCode {
    let verdict = Config::load(&args.config.config)
        .map_err(|e| e.to_string())
        .and_then(|config| healthcheck::admin_target(&config).map_err(|e| e.to_string()))
        .and_then(|addr| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the async runtime: {e}"))?;
            runtime
                .block_on(healthcheck::check(addr, args.timeout))
                .map_err(|e| e.to_string())
        });
    match verdict {
        Ok(status) => {
            println!("{status}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("sluice healthcheck: not ready: {why}");
            ExitCode::FAILURE
        }
    }
}

fn serve(
    args: &RunArgs,
    log_format: Option<LogFormat>,
    demo: Option<(usize, Duration)>,
) -> ExitCode {
    block_on(log_format, args.workers, run(&args.config.config, demo))
}

/// Set up logging and a runtime with `workers` threads, run `work` on it and report its error.
fn block_on(
    log_format: Option<LogFormat>,
    workers: Option<usize>,
    work: impl Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    telemetry::init(log_format);
    // Multi-thread even with one worker: the current-thread runtime was tried, and admitted
    // less in a refusal storm at a higher CPU cost per answer (BENCHMARKS.md, scenario 2).
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = workers {
        runtime.worker_threads(workers.max(1));
    }
    let result = runtime
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|rt| rt.block_on(work));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("sluice: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(path: &Path, demo: Option<(usize, Duration)>) -> anyhow::Result<()> {
    let mut config = Config::load(path)?;
    let mut demo_endpoints = Vec::new();
    if let Some((count, latency)) = demo {
        anyhow::ensure!(count > 0, "--endpoints must be at least 1");
        for i in 1..=count {
            let addr = SocketAddr::from(([127, 0, 0, 1], 0));
            let endpoint = demo::start(format!("demo-{i}"), addr, latency)
                .await
                .context("cannot start a demo endpoint")?;
            demo_endpoints.push(endpoint);
        }
        // The demo serves the shipped config with its endpoints replaced by the demo ones.
        let mut edited = config.into_config();
        for service in &mut edited.services {
            service.endpoints = demo_endpoints
                .iter()
                .map(|e| EndpointConfig::Url(e.url()))
                .collect();
        }
        config = edited.validated().map_err(|errors| {
            let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
            anyhow::anyhow!("the demo config is invalid: {}", lines.join("; "))
        })?;
    }
    let mut app = App::bind(&config).await?;
    if demo_endpoints.is_empty() {
        // The demo's endpoints are not in the file, so a reload would drop them: run only.
        app = app.reload_from(path.to_owned(), config.clone());
    }
    tracing::info!(config = %path.display(), summary = %config.summary(), "config loaded");
    if !demo_endpoints.is_empty() {
        let port = app.proxy_addr().port();
        let urls: Vec<String> = demo_endpoints.iter().map(demo::DemoEndpoint::url).collect();
        println!(
            "sluice demo: {} endpoint(s) at {}",
            urls.len(),
            urls.join(", ")
        );
        println!(
            "sluice demo: proxy on {}; try: curl -i localhost:{port}/score",
            app.proxy_addr()
        );
    }
    app.run(armed_shutdown_signal().await).await;
    Ok(())
}

/// [`app::shutdown_signal`], polled once so that its SIGTERM/SIGINT handlers are installed
/// before sluice says it listens: a signal sent right after that line stops the process
/// cleanly instead of killing it with the default action.
async fn armed_shutdown_signal() -> Pin<Box<dyn Future<Output = ()> + Send>> {
    let mut shutdown = Box::pin(app::shutdown_signal());
    tokio::select! {
        biased;
        () = &mut shutdown => Box::pin(std::future::ready(())),
        () = std::future::ready(()) => shutdown,
    }
}

/// `sluice demo-endpoints`: `count` demo endpoints from `listen` on, until SIGTERM/SIGINT.
async fn demo_endpoints_only(args: &DemoEndpointsArgs) -> anyhow::Result<()> {
    let first = args.listen;
    let addrs = (0..args.count)
        .map(|i| match first.port() {
            0 => Some(first),
            port => port.checked_add(i).map(|p| SocketAddr::new(first.ip(), p)),
        })
        .collect::<Option<Vec<_>>>()
        .with_context(|| format!("{} ports from {first} go past port 65535", args.count))?;
    let mut endpoints = Vec::with_capacity(addrs.len());
    for (i, addr) in addrs.into_iter().enumerate() {
        let endpoint = demo::start(format!("demo-{}", i + 1), addr, args.latency)
            .await
            .with_context(|| format!("cannot start a demo endpoint on {addr}"))?;
        endpoints.push(endpoint);
    }
    let shutdown = armed_shutdown_signal().await;
    let urls: Vec<String> = endpoints.iter().map(demo::DemoEndpoint::url).collect();
    let urls = urls.join(", ");
    let latency = humantime::format_duration(args.latency);
    tracing::info!(endpoints = %urls, %latency, "demo endpoints listening");
    println!(
        "sluice demo-endpoints: {} endpoint(s) answering after {latency} at {urls}",
        endpoints.len()
    );
    shutdown.await;
    for endpoint in &endpoints {
        endpoint.task.abort();
    }
    tracing::info!("demo endpoints stopped");
    Ok(())
}
