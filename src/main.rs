//! The command line: parse arguments, load the config, start. No logic of its own.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use residency_gateway::{audit, config::Config, dev, explain, server};

// Measured in benches/load.sh: the request path allocates a few dozen times, and mimalloc takes about
// 15% off the CPU per request compared with the system allocator. Built without transparent huge pages
// (`no_thp`): with them, 1,000 idle TLS connections cost about 22 MiB more RSS.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "residency-gateway",
    version,
    about = "Stops API traffic from crossing a border the token does not allow"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        #[arg(short, long, default_value = "gateway.toml")]
        config: PathBuf,
    },
    /// Validate a config and its policies; exit 1 on any error.
    Check {
        #[arg(short, long, default_value = "gateway.toml")]
        config: PathBuf,
    },
    /// Show the decision a route makes for a token or claims, and why. Exit 0 forward, 3 block,
    /// 4 token rejected, 1 error.
    Explain {
        #[arg(short, long, default_value = "gateway.toml")]
        config: PathBuf,
        #[arg(long)]
        route: String,
        /// A token to check (verified against its issuer unless --no-verify).
        #[arg(long, conflicts_with = "claims", required_unless_present = "claims")]
        token: Option<String>,
        /// Claims as a JSON object, instead of a token.
        #[arg(long)]
        claims: Option<String>,
        /// Decode the token without verifying it.
        #[arg(long, requires = "token")]
        no_verify: bool,
    },
    /// Run an embedded issuer, two upstreams and the gateway on loopback, and print curl commands.
    Dev {
        /// Run the requests and exit non-zero on any unexpected decision.
        #[arg(long)]
        smoke: bool,
    },
}

fn main() -> ExitCode {
    // On one CPU (a container limited to one, or `taskset`), the single-threaded scheduler: no work
    // stealing and no cross-thread wake-ups; under load (benches/load.sh) it serves a quarter to a half
    // more requests than the multi-threaded scheduler with its one worker. Otherwise one worker per CPU.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // TOKIO_WORKER_THREADS, tokio's own setting, asks for the multi-threaded scheduler with that many.
    let runtime = if cpus == 1 && std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
    .enable_all()
    .build();
    match runtime {
        Ok(rt) => rt.block_on(run(cpus)),
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cpus: usize) -> ExitCode {
    residency_gateway::token::crypto::install();
    let cli = Cli::parse();
    let _guard = audit::init_logging();
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                for w in &c.warnings {
                    eprintln!("warning: {w}");
                }
                println!("{}: ok ({} routes, {} issuers)", config.display(), c.routes.len(), c.issuers.len());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::FAILURE;
                }
            };
            for w in &cfg.warnings {
                tracing::warn!("{w}");
            }
            let scheduler = match tokio::runtime::Handle::current().runtime_flavor() {
                tokio::runtime::RuntimeFlavor::CurrentThread => "single-threaded",
                _ => "multi-threaded",
            };
            tracing::info!(cpus, scheduler, "async runtime");
            match server::start(cfg, Some(config)).await {
                Ok(mut handle) => {
                    if let Err(e) = serve_until_signalled(&mut handle).await {
                        eprintln!("{e}");
                        return ExitCode::FAILURE;
                    }
                    handle.shutdown().await;
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Explain { config, route, token, claims, no_verify } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::FAILURE;
                }
            };
            let input = match (token, claims) {
                (Some(token), _) => explain::Input::Token { token, verify: !no_verify },
                (None, Some(c)) => explain::Input::Claims(c),
                (None, None) => {
                    eprintln!("explain needs --token or --claims");
                    return ExitCode::FAILURE;
                }
            };
            let (text, code) = explain::run(&cfg, &route, input).await;
            print!("{text}");
            ExitCode::from(code)
        }
        Command::Dev { smoke } => match dev::run(smoke).await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("dev: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// SIGHUP reloads; SIGTERM and SIGINT return so the caller drains and exits.
async fn serve_until_signalled(handle: &mut server::Handle) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    let runtime = handle.runtime.clone();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = hup.recv() => {
                let _ = runtime.reload().await;
            }
            _ = handle.stopped() => return Err("a listener stopped".into()),
        }
    }
}
