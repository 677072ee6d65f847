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
    Ca(Box<CaCommand>),
    /// Show this node's enrolled pods, their identities and certificate expiry.
    Status(cli::Common),
    /// Print this CLI's version and, if it answers, the local agent's.
    Version(cli::Common),
    /// Print the Kubernetes install (Namespace, RBAC, the agent DaemonSet, the CA Deployment)
    /// as YAML for `kubectl apply -f -`.
    Manifests(Box<crate::install::ManifestArgs>),
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
    #[command(flatten)]
    kube: KubeCaArgs,
}

/// Where the CA keeps its root in Kubernetes, and whom it serves there.
#[derive(Debug, Clone, clap::Args)]
struct KubeCaArgs {
    /// Run in Kubernetes: the root in a Secret, the bundle in a ConfigMap, agents checked with
    /// TokenReview and pods from the API (instead of --dir and --config).
    #[arg(long)]
    kubernetes: bool,
    /// kubeconfig to reach the API server; without it, the pod's service account.
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
    /// The CA's namespace, where its Secret and the bundle ConfigMap live.
    #[arg(long, env = "POD_NAMESPACE", default_value = "mesh-system")]
    namespace: String,
    /// The Secret holding the root (created on first start).
    #[arg(long, default_value = "mesh-ca-root")]
    root_secret: String,
    /// The ConfigMap the trust bundle is published in, as `bundle.pem`.
    #[arg(long, default_value = "mesh-trust-bundle")]
    bundle_configmap: String,
    /// The agents' service account, `namespace/name`: the only one whose tokens are accepted.
    #[arg(long, default_value = "mesh-system/mesh-agent")]
    agent_service_account: String,
    /// The audience agents' tokens must carry.
    #[arg(long, default_value = "mesh-ca")]
    audience: String,
}

impl KubeCaArgs {
    async fn connect(&self) -> Result<(::kube::Client, ca_server::kube::KubeCa), ca::CaError> {
        let (agent_namespace, agent_service_account) = self
            .agent_service_account
            .split_once('/')
            .filter(|(n, s)| !n.is_empty() && !s.is_empty() && !s.contains('/'))
            .ok_or_else(|| {
                ca::CaError::Kubernetes(format!(
                    "--agent-service-account {:?} is not namespace/name",
                    self.agent_service_account
                ))
            })?;
        let client = crate::discovery::kube::client(self.kubeconfig.as_deref())
            .await
            .map_err(|e| ca::CaError::Kubernetes(e.to_string()))?;
        let cfg = ca_server::kube::KubeCa {
            namespace: self.namespace.clone(),
            root_secret: self.root_secret.clone(),
            bundle_configmap: self.bundle_configmap.clone(),
            agent_namespace: agent_namespace.to_string(),
            agent_service_account: agent_service_account.to_string(),
            audience: self.audience.clone(),
        };
        Ok((client, cfg))
    }

    /// Runs one rotation step on the root Secret.
    fn step(
        &self,
        step: impl FnOnce(&ca::RootSet, &dyn ca::RootSource) -> Result<ca::RootSet, ca::CaError>,
    ) -> Result<(), ca::CaError> {
        let rt =
            runtime(Some(1)).ok_or_else(|| ca::CaError::Kubernetes("no async runtime".into()))?;
        rt.block_on(async {
            let (client, cfg) = self.connect().await?;
            ca_server::kube::step(&client, &cfg, step).await
        })
    }
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
        #[command(flatten)]
        kube: KubeCaArgs,
    },
    /// Make the prepared root the signing root (after every agent renewed once since
    /// `rotate-root`: half a certificate lifetime).
    ActivateRoot {
        /// The CA's root directory.
        #[arg(long, default_value = "/var/lib/mesh-ca")]
        dir: std::path::PathBuf,
        #[command(flatten)]
        kube: KubeCaArgs,
    },
    /// Trust only the current root (after every certificate of the old one has expired).
    RetireRoots {
        /// The CA's root directory.
        #[arg(long, default_value = "/var/lib/mesh-ca")]
        dir: std::path::PathBuf,
        #[command(flatten)]
        kube: KubeCaArgs,
    },
    /// Ask a CA for a certificate as a node would, and print what it answers (for debugging
    /// node authorization). The key is thrown away.
    Request {
        /// The CA's address.
        #[arg(long)]
        ca_addr: ca::CaAddr,
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
    b.on_thread_park(crate::app::on_thread_park);
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

/// Applies one rotation step where the root lives: the Secret with `--kubernetes`, else the
/// directory.
fn root_step(
    dir: &std::path::Path,
    kube: &KubeCaArgs,
    step: impl FnOnce(&ca::RootSet, &dyn ca::RootSource) -> Result<ca::RootSet, ca::CaError>,
) -> Result<(), ca::CaError> {
    if kube.kubernetes {
        kube.step(step)
    } else {
        ca::step_dir(dir, step)
    }
}

fn ca_main(cmd: CaCommand) -> ExitCode {
    let result = match cmd.action {
        Some(CaAction::RotateRoot {
            dir,
            trust_domain,
            kube,
        }) => root_step(&dir, &kube, |set, src| ca::rotated(set, &trust_domain, src)).map(|()| {
            info!("new root prepared and trusted; run `mesh-agent ca activate-root` after half a certificate lifetime");
        }),
        Some(CaAction::ActivateRoot { dir, kube }) => root_step(&dir, &kube, ca::activated).map(|()| {
            info!("the new root signs now; old roots stay trusted until `mesh-agent ca retire-roots`");
        }),
        Some(CaAction::RetireRoots { dir, kube }) => root_step(&dir, &kube, ca::retired)
            .map(|()| info!("only the current root is trusted now")),
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
    let listen = a.listen;
    let bind = || async move {
        tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| bad(format!("cannot listen on {listen}: {e}")))
    };
    if a.kube.kubernetes {
        let (client, cfg) = a.kube.connect().await?;
        let root = ca_server::kube::root(&client, &cfg, &a.trust_domain).await?;
        let authority =
            std::sync::Arc::new(ca::Ca::with_source(root.clone(), &a.trust_domain, ttl)?);
        ca_server::kube::keep_current(client.clone(), cfg.clone(), root, authority.clone());
        let listener = bind().await?;
        info!(%listen, namespace = %cfg.namespace, secret = %cfg.root_secret, ttl = ?ttl, "CA serving in Kubernetes");
        let nodes = ca_server::Nodes::Kubernetes(Box::new((client, cfg)));
        return ca_server::serve(authority, listener, std::sync::Arc::new(nodes)).await;
    }
    let Some(config_path) = &a.config else {
        return Err(bad(
            "--config is required outside Kubernetes: the CA must know each node's token and node file (or pass --kubernetes)".into(),
        ));
    };
    let nodes = ca_server::load_config(config_path)?;
    let authority = std::sync::Arc::new(ca::Ca::open(&a.dir, &a.trust_domain, ttl)?);
    let listener = bind().await?;
    info!(%listen, dir = %a.dir.display(), nodes = nodes.len(), ttl = ?ttl, "CA serving");
    let nodes = ca_server::Nodes::Files(nodes);
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
        Command::Ca(cmd) => ca_main(*cmd),
        Command::Status(c) => client_result(cli::status(&c)),
        Command::Version(c) => client_result(cli::version(&c)),
        Command::Manifests(a) => match crate::install::render(&a) {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                error!("rendering the manifests: {e}");
                ExitCode::FAILURE
            }
        },
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
