//! The `mesh-agent` command line: every subcommand, parsed with clap and handed to the module
//! that does the work (`run` to [`crate::app`], `ca` to [`crate::identity::ca`], the admin clients to
//! [`crate::cli`]). `main.rs` calls [`main`] and nothing else.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tracing::{error, info};

use crate::{
    admin, app, ca_server, capture::bpf, cli, config, discovery::nodefile, identity::ca,
    identity::certs,
};

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
    Run(Box<config::RunArgs>),
    /// Validate a node file and print every problem; exits non-zero if there are any.
    Check {
        /// The node file.
        node_file: std::path::PathBuf,
        /// Pods' cgroups must be strictly below this cgroup (as `run --pod-cgroup-root`).
        #[arg(long, env = config::ENV_POD_CGROUP_ROOT)]
        pod_cgroup_root: Option<std::path::PathBuf>,
    },
    /// Remove this agent's capture (links), programs and maps from the bpffs. Enrolled pods'
    /// traffic then flows directly, without the mesh.
    Uninstall(config::PinArgs),
    /// Run the mesh CA server, or manage its root (see the subcommands).
    Ca(CaCommand),
    /// Show this node's enrolled pods, their identities and certificate expiry.
    Status(cli::Common),
    /// Show recent flows (connections and requests) with their decisions, then follow new ones.
    Flows(cli::FlowsArgs),
    /// Explain which route, policy and endpoint would apply to a connection or request, and why.
    Explain(cli::ExplainArgs),
    /// Dump what the agent works from: pods, services, routes, policies, certificates (no keys)
    /// and BPF maps.
    ConfigDump(cli::Common),
}

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct CaCommand {
    #[command(subcommand)]
    action: Option<CaAction>,
    #[command(flatten)]
    serve: CaServeArgs,
}

#[derive(Debug, clap::Args)]
struct CaServeArgs {
    /// Root directory: root-key.pem, root-cert.pem, bundle.pem; created on first start.
    #[arg(long, default_value = "/var/lib/mesh-ca")]
    dir: std::path::PathBuf,
    /// Address to serve CSRs on (TLS).
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: std::net::SocketAddr,
    /// YAML listing the nodes: `nodes: [{name, tokenFile, nodeFile}]`.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// The mesh's SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Lifetime of the certificates it signs (renewed by agents at half-life).
    #[arg(long, default_value = "24h")]
    cert_ttl: String,
}

#[derive(Debug, Subcommand)]
enum CaAction {
    /// Prepare a new root: trusted from now on, signing only after `activate-root`.
    RotateRoot {
        /// The CA's root directory.
        #[arg(long, default_value = "/var/lib/mesh-ca")]
        dir: std::path::PathBuf,
        /// The mesh's SPIFFE trust domain.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
    /// Make the prepared root the signing root (after every agent renewed once since
    /// `rotate-root`: half a certificate lifetime).
    ActivateRoot {
        /// The CA's root directory.
        #[arg(long, default_value = "/var/lib/mesh-ca")]
        dir: std::path::PathBuf,
    },
    /// Trust only the current root (after every certificate of the old one has expired).
    RetireRoots {
        /// The CA's root directory.
        #[arg(long, default_value = "/var/lib/mesh-ca")]
        dir: std::path::PathBuf,
    },
    /// Ask a CA for a certificate as a node would, and print what it answers (for debugging
    /// node authorization). The key is thrown away.
    Request {
        /// The CA's address.
        #[arg(long)]
        ca_addr: std::net::SocketAddr,
        /// The node's token file.
        #[arg(long)]
        ca_token_file: std::path::PathBuf,
        /// The CA's bundle.pem.
        #[arg(long)]
        ca_bundle: std::path::PathBuf,
        /// Also write the private key (PEM, mode 0600) here, e.g. to test a workload's access
        /// by hand; without it the key is discarded.
        #[arg(long)]
        key_out: Option<std::path::PathBuf>,
        /// The identity to ask for, spiffe://<td>/ns/<ns>/sa/<sa>.
        identity: String,
    },
}

/// Raises the soft open-file limit to the hard one. Every proxied connection holds a
/// descriptor, and the usual soft limit of 1024 would refuse the 1025th connection on a node.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct they are given.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 && {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) == 0
        }
    };
    if raised {
        info!(limit = lim.rlim_cur, "open-file limit");
    } else {
        tracing::warn!(
            "cannot raise the open-file limit ({}); connections beyond the current limit will be refused",
            std::io::Error::last_os_error()
        );
    }
}

/// The async runtime: multi-threaded, with `workers` threads if given.
fn runtime(workers: Option<usize>) -> Option<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        b.worker_threads(n);
    }
    match b.enable_all().build() {
        Ok(rt) => Some(rt),
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            None
        }
    }
}

fn ca_main(cmd: CaCommand) -> ExitCode {
    let result = match cmd.action {
        Some(CaAction::RotateRoot { dir, trust_domain }) => {
            ca::rotate_root(&dir, &trust_domain).map(|()| {
                info!(dir = %dir.display(), "new root prepared and trusted; run `mesh-agent ca activate-root` after half a certificate lifetime");
            })
        }
        Some(CaAction::ActivateRoot { dir }) => ca::activate_root(&dir).map(|()| {
            info!(dir = %dir.display(), "the new root signs now; old roots stay trusted until `mesh-agent ca retire-roots`");
        }),
        Some(CaAction::RetireRoots { dir }) => ca::retire_roots(&dir).map(|()| {
            info!(dir = %dir.display(), "only the current root is trusted now");
        }),
        Some(CaAction::Request {
            ca_addr,
            ca_token_file,
            ca_bundle,
            key_out,
            identity,
        }) => {
            let Some(rt) = runtime(None) else {
                return ExitCode::FAILURE;
            };
            rt.block_on(certs::request_once(
                ca_addr,
                ca_token_file,
                ca_bundle,
                &identity,
                key_out.as_deref(),
            ))
            .map(|issued| println!("{}", issued.certificate))
        }
        None => {
            let a = cmd.serve;
            let Some(rt) = runtime(None) else {
                return ExitCode::FAILURE;
            };
            rt.block_on(serve_ca(a))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve_ca(a: CaServeArgs) -> Result<(), ca::CaError> {
    let bad = |problem: String| ca::CaError::Config {
        path: a.config.clone().unwrap_or_default(),
        problem,
    };
    let ttl = config::parse_duration("--cert-ttl", &a.cert_ttl).map_err(|e| bad(e.to_string()))?;
    let Some(config_path) = &a.config else {
        return Err(bad(
            "--config is required: the CA must know each node's token and node file".into(),
        ));
    };
    let nodes = ca_server::load_config(config_path)?;
    let authority = std::sync::Arc::new(ca::Ca::open(&a.dir, &a.trust_domain, ttl)?);
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .map_err(|e| bad(format!("cannot listen on {}: {e}", a.listen)))?;
    info!(listen = %a.listen, dir = %a.dir.display(), nodes = nodes.len(), ttl = ?ttl, "CA serving");
    ca_server::serve(authority, listener, std::sync::Arc::new(nodes)).await
}

/// Starts logging to stderr with `RUST_LOG` (default `info`); the returned control changes the
/// filter at run time (`/logging`).
fn init_logging(format: LogFormat) -> admin::LogControl {
    use tracing_subscriber::{EnvFilter, reload};
    let initial = std::env::var("RUST_LOG")
        .ok()
        .filter(|f| EnvFilter::try_new(f).is_ok())
        .unwrap_or_else(|| "info".into());
    fn control<S: 'static>(initial: String, h: reload::Handle<EnvFilter, S>) -> admin::LogControl {
        admin::LogControl::new(initial, move |f| {
            let filter = EnvFilter::try_new(f).map_err(|e| e.to_string())?;
            h.reload(filter).map_err(|e| e.to_string())
        })
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(&initial))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let b = builder.with_filter_reloading();
            let h = b.reload_handle();
            b.init();
            control(initial, h)
        }
        LogFormat::Json => {
            let b = builder.json().with_filter_reloading();
            let h = b.reload_handle();
            b.init();
            control(initial, h)
        }
    }
}

/// Exit status of an admin-client command; its error goes to stderr.
fn client_result(r: Result<(), cli::CliError>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Parses the command line and runs the subcommand it names.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let logging = init_logging(cli.log_format);
    match cli.command {
        Command::Run(args) => {
            let config = match config::Config::from_args(*args) {
                Ok(c) => c,
                Err(e) => {
                    error!("{e}");
                    return ExitCode::from(2);
                }
            };
            info!(?config, "effective configuration");
            raise_fd_limit();
            let Some(rt) = runtime(Some(config.worker_threads)) else {
                return ExitCode::FAILURE;
            };
            match rt.block_on(app::run(config, logging)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check {
            node_file,
            pod_cgroup_root,
        } => match nodefile::load(&node_file, None, pod_cgroup_root.as_deref()) {
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
        Command::Ca(cmd) => ca_main(cmd),
        Command::Status(c) => client_result(cli::status(&c)),
        Command::Flows(a) => client_result(cli::flows(&a)),
        Command::Explain(a) => client_result(cli::explain(&a)),
        Command::ConfigDump(c) => client_result(cli::config_dump(&c)),
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
