//! The agent's settings: one name, one default and one validation step each, from flags or
//! environment variables; the effective configuration is logged at start.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;

/// Environment variable for `--node-file`.
pub const ENV_NODE_FILE: &str = "MESH_NODE_FILE";
/// Environment variable for `--bpffs`.
pub const ENV_BPFFS: &str = "MESH_BPFFS";
/// Environment variable for `--pin-name`.
pub const ENV_PIN_NAME: &str = "MESH_PIN_NAME";
/// Environment variable for `--bpf-object`.
pub const ENV_BPF_OBJECT: &str = "MESH_BPF_OBJECT";
/// Environment variable for `--admin-addr`.
pub const ENV_ADMIN_ADDR: &str = "MESH_ADMIN_ADDR";

/// Errors in the settings themselves.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The pin name would escape the bpffs directory or is empty.
    #[error(
        "--pin-name {0:?} must be a single non-empty path component (letters, digits, '-', '_', '.')"
    )]
    PinName(String),
    /// No BPF object given and none next to the executable.
    #[error(
        "no eBPF object found at {0}: pass --bpf-object (or {ENV_BPF_OBJECT}), or build with `cargo xtask build`"
    )]
    NoObject(PathBuf),
    /// The poll interval is zero.
    #[error("--poll-interval-ms must be at least 1")]
    PollInterval,
}

/// Flags of `mesh-agent run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The node file (YAML) listing this node's pods and the mesh's services.
    #[arg(long, env = ENV_NODE_FILE)]
    pub node_file: PathBuf,
    #[command(flatten)]
    pub pins: PinArgs,
    /// The compiled eBPF object; defaults to `mesh-ebpf.o` next to this executable.
    #[arg(long, env = ENV_BPF_OBJECT)]
    pub bpf_object: Option<PathBuf>,
    /// Loopback address of the admin endpoints (/healthz, /ready, /stats).
    #[arg(long, env = ENV_ADMIN_ADDR, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// How often to check the node file for changes, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub poll_interval_ms: u64,
}

/// Where this agent keeps its pins.
#[derive(Debug, Args)]
pub struct PinArgs {
    /// Mount point of the bpf filesystem.
    #[arg(long, env = ENV_BPFFS, default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
    /// Directory under the bpffs for this agent's maps, programs and links. Agents sharing a
    /// kernel (as simulated nodes do) need distinct names.
    #[arg(long, env = ENV_PIN_NAME, default_value = "mesh")]
    pub pin_name: String,
}

impl PinArgs {
    /// Validates the pin name and returns `<bpffs>/<pin-name>`.
    pub fn root(&self) -> Result<PathBuf, ConfigError> {
        let ok = !self.pin_name.is_empty()
            && self.pin_name != "."
            && self.pin_name != ".."
            && self
                .pin_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if ok {
            Ok(self.bpffs.join(&self.pin_name))
        } else {
            Err(ConfigError::PinName(self.pin_name.clone()))
        }
    }
}

/// The validated configuration of `mesh-agent run`.
#[derive(Debug, Clone)]
pub struct Config {
    /// The node file.
    pub node_file: PathBuf,
    /// The bpffs mount.
    pub bpffs: PathBuf,
    /// `<bpffs>/<pin-name>`.
    pin_root: PathBuf,
    /// The eBPF object.
    pub bpf_object: PathBuf,
    /// The admin address.
    pub admin_addr: SocketAddr,
    /// Node-file poll interval.
    pub poll_interval: Duration,
}

impl Config {
    /// Validates `args`.
    pub fn from_args(args: RunArgs) -> Result<Self, ConfigError> {
        let pin_root = args.pins.root()?;
        let bpf_object = match args.bpf_object {
            Some(p) => p,
            None => {
                let beside = std::env::current_exe()
                    .ok()
                    .and_then(|e| e.parent().map(|d| d.join("mesh-ebpf.o")))
                    .unwrap_or_else(|| PathBuf::from("mesh-ebpf.o"));
                if !beside.exists() {
                    return Err(ConfigError::NoObject(beside));
                }
                beside
            }
        };
        if args.poll_interval_ms == 0 {
            return Err(ConfigError::PollInterval);
        }
        Ok(Self {
            node_file: args.node_file,
            bpffs: args.pins.bpffs,
            pin_root,
            bpf_object,
            admin_addr: args.admin_addr,
            poll_interval: Duration::from_millis(args.poll_interval_ms),
        })
    }

    /// `<bpffs>/<pin-name>`.
    pub fn pin_root(&self) -> PathBuf {
        self.pin_root.clone()
    }
}
