//! `cargo xtask <task>`: the project's build entry points.
//!
//! - `setup` installs every prerequisite a fresh machine lacks, idempotently;
//! - `build` builds the eBPF object (nightly, build-std, bpf-linker) and then the host binaries;
//! - `test` runs every test, the kernel tests included (needs root; never skips them);
//! - `lint` runs rustfmt (the eBPF crate's too), clippy and the layering check;
//! - `layers` checks that mesh-agent's modules import each other without cycles, downwards only;
//! - `demo` runs a two-node mesh with traffic and prints what was captured;
//! - `bench` measures direct vs mesh paths side by side.
//!
//! Every task that needs tools calls `setup` first.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod layers;
mod vm;

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install prerequisites (apt packages, rust-src, bpf-linker) and mount bpffs.
    Setup,
    /// Build the eBPF object and the host binaries.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Run every test (unit, kernel and end-to-end). Must run as root. With `--kernel`, run the
    /// kernel and end-to-end suites inside a qemu guest booted from that kernel instead.
    Test {
        /// A kernel to boot in qemu: a version (`6.1`: Debian's newest 6.1 cloud kernel), a
        /// `.deb`, or an extracted kernel package.
        #[arg(long)]
        kernel: Option<String>,
        /// With `--kernel`: the suites (tests/tests/<suite>.rs) to run in the guest, repeatable
        /// (default: unit, kernel, datapath, identity, l7; `unit` is mesh-agent's unit tests).
        #[arg(long = "suite")]
        suites: Vec<String>,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// rustfmt --check (both workspaces), clippy -D warnings, and the layering check.
    Lint,
    /// Check that mesh-agent's modules have no import cycle and import only lower layers.
    Layers,
    /// Start a two-node demo mesh, send traffic, print what was captured, clean up.
    Demo {
        /// Tell the story on Kubernetes (a stand-in API server, kubectl and standard YAML).
        #[arg(long)]
        kubernetes: bool,
    },
    /// Benchmark direct vs mesh paths and print a table of ratios.
    Bench,
    /// Run the fuzz targets of mesh-agent/fuzz (cargo-fuzz on nightly, installed if missing):
    /// each for `--seconds` or `--runs` executions, or briefly with `--smoke` (CI). New inputs
    /// go to target/fuzz-corpus; the committed seeds are read, never written.
    Fuzz {
        /// A few seconds each: what CI runs.
        #[arg(long)]
        smoke: bool,
        /// Seconds per target (overrides --smoke).
        #[arg(long)]
        seconds: Option<u64>,
        /// Executions per target, however long they take (the bar is 1,000,000).
        #[arg(long, conflicts_with_all = ["smoke", "seconds"])]
        runs: Option<u64>,
        /// Only these targets (default: every one).
        targets: Vec<String>,
    },
    /// Render the Kubernetes install (`mesh-agent manifests`, with and without the CRDs) and
    /// validate it offline against the real schemas of two Kubernetes versions.
    ValidateInstall,
}

/// cargo-fuzz release known to work with the nightly here.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Seconds per target in `fuzz --smoke`.
const FUZZ_SMOKE_SECONDS: u64 = 15;

/// How long each fuzz target runs.
enum FuzzBudget {
    Seconds(u64),
    /// A count of executions, so a claim of "N executions" can be repeated exactly.
    Runs(u64),
}

impl FuzzBudget {
    /// libFuzzer's flag for this budget.
    fn flag(&self) -> String {
        match self {
            Self::Seconds(s) => format!("-max_total_time={s}"),
            Self::Runs(n) => format!("-runs={n}"),
        }
    }
}

impl std::fmt::Display for FuzzBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Seconds(s) => write!(f, "for {s} s"),
            Self::Runs(n) => write!(f, "for {n} executions"),
        }
    }
}

/// Builds the fuzz targets once and runs each within `budget`; a crash fails the run, with
/// libFuzzer's reproducer left in mesh-agent/fuzz/artifacts/.
fn fuzz(budget: &FuzzBudget, only: &[String]) -> Result<()> {
    let have = output(Command::new("cargo").args(["fuzz", "--version"]))
        .is_some_and(|v| v.contains(CARGO_FUZZ_VERSION));
    if !have {
        status(Command::new("cargo").args([
            "install",
            "--locked",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
        ]))?;
    }
    let dir = root().join("mesh-agent");
    let listed = output(
        Command::new("cargo")
            .current_dir(&dir)
            .args(["+nightly", "fuzz", "list"]),
    )
    .context("cargo fuzz list")?;
    let targets: Vec<&str> = listed
        .lines()
        .map(str::trim)
        .filter(|t| !t.is_empty() && (only.is_empty() || only.iter().any(|o| o == t)))
        .collect();
    if targets.is_empty() {
        bail!(
            "no fuzz target matches {only:?}; `cargo +nightly fuzz list` in mesh-agent lists them"
        );
    }
    status(
        Command::new("cargo")
            .current_dir(&dir)
            .args(["+nightly", "fuzz", "build", "-O"])
            .env_remove("RUSTUP_TOOLCHAIN"),
    )?;
    for t in &targets {
        let corpus = root().join("target/fuzz-corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        let seeds = dir.join("fuzz/seeds").join(t);
        println!("fuzzing {t} {budget}");
        status(
            Command::new("cargo")
                .current_dir(&dir)
                .args(["+nightly", "fuzz", "run", "-O", t])
                .arg(&corpus)
                .arg(&seeds)
                .arg("--")
                .arg(budget.flag())
                .arg("-print_final_stats=1")
                .env_remove("RUSTUP_TOOLCHAIN"),
        )
        .with_context(|| {
            format!("fuzz target {t} failed: its reproducer is in mesh-agent/fuzz/artifacts/{t}/")
        })?;
    }
    Ok(())
}

/// kubernetes-validate (PyPI) release: it carries the schemas of every version below.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// The oldest and newest Kubernetes versions the install supports (README), validated strictly.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.35.0"];

/// Installs kubernetes-validate in a venv under target/ (once), renders the install and
/// validates it with `--strict` (unknown fields are errors) for each supported version.
fn validate_install() -> Result<()> {
    let venv = root().join("target/kubernetes-validate");
    let tool = venv.join("bin/kubernetes-validate");
    if !tool.exists() {
        if status(Command::new("python3").args(["-m", "venv"]).arg(&venv)).is_err() {
            // Debian's python3 keeps venv in its own package.
            status(
                Command::new("apt-get")
                    .args([
                        "install",
                        "-y",
                        "-qq",
                        "--no-install-recommends",
                        "python3-venv",
                    ])
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )?;
            status(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        }
        status(Command::new(venv.join("bin/pip")).args(["install", "-q", KUBERNETES_VALIDATE]))?;
    }
    for extra in [&[][..], &["--istio-crds"][..]] {
        let yaml = output(
            cargo()
                .current_dir(root())
                .args(["run", "-q", "-p", "mesh-agent", "--", "manifests"])
                .args(extra),
        )
        .context("render the install with `mesh-agent manifests`")?;
        let file = root().join(format!("target/install{}.yaml", extra.join("")));
        std::fs::write(&file, yaml)?;
        for v in KUBERNETES_VERSIONS {
            println!(
                "validating {} against Kubernetes {v} (strict)",
                file.display()
            );
            status(
                Command::new(&tool)
                    .args(["--strict", "--quiet", "-k", v])
                    .arg(&file),
            )?;
        }
    }
    Ok(())
}

/// bpf-linker release known to build against LLVM 22 here.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// LLVM major version of the nightly toolchain; bpf-linker must match it.
const LLVM_MAJOR: &str = "22";
/// Debian packages: LLVM for bpf-linker, kernel tooling, and the bench's load tools.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "bpftool",
    "iproute2",
    "util-linux",
    "curl",
    "wrk",
    "iperf3",
    // The bench's peer: a two-hop mTLS proxy chain, and the certificates for it.
    "haproxy",
    "openssl",
    // A real Prometheus text parser for the telemetry tests.
    "python3-prometheus-client",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn status(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let st = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed with {st}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

fn setup() -> Result<()> {
    // Debian packages.
    // kubectl drives the stand-in API server in the Kubernetes tests. These machines carry a
    // recent one; Debian's kubernetes-client is the fallback where none is on the PATH.
    let kubectl = output(Command::new("kubectl").args(["version", "--client"])).is_some();
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .chain(vm::APT_PACKAGES.iter().copied())
        .chain((!kubectl).then_some("kubernetes-client"))
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        if !is_root() {
            bail!(
                "missing Debian packages {missing:?}; run `cargo xtask setup` as root to install them"
            );
        }
        status(Command::new("apt-get").args(["update", "-qq"]))?;
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    // Nightly rust-src, for -Z build-std.
    let nightly = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !nightly.lines().any(|l| l.starts_with("nightly")) {
        bail!(
            "no nightly toolchain: install it with `rustup toolchain install nightly` (this machine kind ships one)"
        );
    }
    let comps = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if !comps.lines().any(|l| l.starts_with("rust-src")) {
        status(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    // bpf-linker built against the same LLVM major as rustc.
    let rustc_llvm = output(Command::new("rustc").args(["+nightly", "-vV"]))
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("LLVM version: ")
                    .map(|v| v.split('.').next().unwrap_or("").to_string())
            })
        })
        .unwrap_or_default();
    if rustc_llvm != LLVM_MAJOR {
        bail!(
            "nightly rustc uses LLVM {rustc_llvm:?}, but this project builds bpf-linker against LLVM {LLVM_MAJOR}; update LLVM_MAJOR and APT_PACKAGES in xtask"
        );
    }
    let linker_ok = output(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION));
    if !linker_ok {
        status(
            Command::new("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--locked",
                    "--version",
                    BPF_LINKER_VERSION,
                ])
                .args([
                    "--no-default-features",
                    "--features",
                    &format!("llvm-{LLVM_MAJOR}"),
                ])
                .env("LLVM_PREFIX", format!("/usr/lib/llvm-{LLVM_MAJOR}")),
        )?;
    }
    // The kernel the CI's guest step boots (`test --kernel`), fetched once.
    if is_root() {
        vm::kernel(vm::CI_KERNEL)?;
    }
    // bpffs, which the agent pins into.
    if is_root() {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        if !mounts.lines().any(|l| l.starts_with("bpf /sys/fs/bpf ")) {
            status(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
        }
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn build(release: bool) -> Result<PathBuf> {
    setup()?;
    let root = root();
    // The eBPF crate has its own workspace and rust-toolchain.toml (nightly). Then the upgrade
    // test's second build: other instructions, the same maps.
    for extra in [
        &["--release"][..],
        &["--profile", "variant", "--features", "upgrade-variant"],
    ] {
        let mut ebpf = Command::new("cargo");
        ebpf.current_dir(root.join("mesh-ebpf"))
            .args(["+nightly", "build"])
            .args(extra)
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC")
            .env_remove("CARGO");
        status(&mut ebpf)?;
    }
    let profile = if release { "release" } else { "debug" };
    let out = root.join("target").join(profile);
    std::fs::create_dir_all(&out)?;
    for (built, name) in [
        ("release", "mesh-ebpf.o"),
        ("variant", "mesh-ebpf-variant.o"),
    ] {
        let object = root
            .join("mesh-ebpf/target/bpfel-unknown-none")
            .join(built)
            .join("mesh-ebpf");
        std::fs::copy(&object, out.join(name))
            .with_context(|| format!("copy {} into {}", object.display(), out.display()))?;
    }
    let mut host = cargo();
    host.current_dir(&root)
        .args(["build", "-p", "mesh-agent", "-p", "mesh-tests", "--bins"]);
    if release {
        host.arg("--release");
    }
    status(&mut host)?;
    Ok(out)
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Build { release } => build(release).map(|_| ()),
        Task::Test {
            kernel: Some(kernel),
            suites,
            args,
        } => {
            build(false)?;
            let suites = if suites.is_empty() {
                vm::DEFAULT_SUITES.iter().map(|s| s.to_string()).collect()
            } else {
                suites
            };
            vm::test(&kernel, &suites, &args)
        }
        Task::Test {
            kernel: None, args, ..
        } => {
            if !is_root() {
                bail!(
                    "the kernel and end-to-end tests need root (eBPF, netns, cgroups) and are never skipped: run `sudo cargo xtask test`"
                );
            }
            build(false)?;
            status(
                cargo()
                    .current_dir(root())
                    .args(["test", "--workspace", "--"])
                    .args(&args),
            )
        }
        Task::Lint => status(
            cargo()
                .current_dir(root())
                .args(["fmt", "--all", "--check"]),
        )
        .and_then(|()| {
            status(cargo().current_dir(root()).args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        })
        .and_then(|()| layers::check(&root().join("mesh-agent/src")))
        .and_then(|()| {
            // The eBPF crate is its own workspace, on nightly: `fmt --all` above skips it.
            status(
                Command::new("cargo")
                    .current_dir(root().join("mesh-ebpf"))
                    .args(["+nightly", "fmt", "--check"])
                    .env_remove("RUSTUP_TOOLCHAIN")
                    .env_remove("RUSTC")
                    .env_remove("CARGO"),
            )
        }),
        Task::Layers => layers::check(&root().join("mesh-agent/src")),
        Task::ValidateInstall => validate_install(),
        Task::Fuzz {
            smoke,
            seconds,
            runs,
            targets,
        } => {
            let budget = match runs {
                Some(n) => FuzzBudget::Runs(n),
                None => FuzzBudget::Seconds(seconds.unwrap_or(if smoke {
                    FUZZ_SMOKE_SECONDS
                } else {
                    60
                })),
            };
            fuzz(&budget, &targets)
        }
        Task::Demo { kubernetes } => {
            let out = build(true)?;
            let mut demo = Command::new(out.join("mesh-demo"));
            if kubernetes {
                demo.arg("--kubernetes");
            }
            status(&mut demo)
        }
        Task::Bench => {
            let out = build(true)?;
            status(&mut Command::new(out.join("mesh-bench")))
        }
    }
}
