//! `mesh-agent`: the node agent of a sidecar-less service mesh.
//!
//! `main` only parses the command line and hands over to [`app`]; see `app.rs` for the wiring.

mod admin;
mod app;
mod bpf;
mod config;
mod netns;
mod nodefile;
mod proxy;
mod state;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tracing::{error, info};

/// Node agent of the sidecar-less mesh.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "MESH_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent in local mode: capture the pods listed in the node file and proxy them.
    Run(config::RunArgs),
    /// Validate a node file and print every problem; exits non-zero if there are any.
    Check {
        /// The node file.
        node_file: std::path::PathBuf,
    },
    /// Remove this agent's capture (links), programs and maps from the bpffs. Enrolled pods'
    /// traffic then flows directly, without the mesh.
    Uninstall(config::PinArgs),
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Run(args) => {
            let config = match config::Config::from_args(args) {
                Ok(c) => c,
                Err(e) => {
                    error!("{e}");
                    return ExitCode::from(2);
                }
            };
            info!(?config, "effective configuration");
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    error!("cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(app::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { node_file } => match nodefile::load(&node_file, None) {
            Ok(l) if l.errors.is_empty() => {
                println!(
                    "{}: ok ({} pods, {} services)",
                    node_file.display(),
                    l.state.pods.len(),
                    l.state.services.len()
                );
                ExitCode::SUCCESS
            }
            Ok(l) => {
                for e in &l.errors {
                    println!("{e}");
                }
                ExitCode::FAILURE
            }
            Err(e) => {
                println!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Uninstall(pins) => {
            let root = match pins.root() {
                Ok(r) => r,
                Err(e) => {
                    error!("{e}");
                    return ExitCode::from(2);
                }
            };
            match bpf::preflight(&pins.bpffs).and_then(|()| bpf::Dataplane::uninstall(&root)) {
                Ok(()) => {
                    info!(root = %root.display(), "capture removed");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
