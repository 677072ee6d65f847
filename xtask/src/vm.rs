//! `cargo xtask test --kernel <version|path>`: the kernel and end-to-end suites inside a qemu
//! guest running another kernel, so that what the host kernel lacks (kTLS, BPF tracing) and
//! what older kernels refuse are tested, not assumed.
//!
//! The guest is an initramfs and nothing else: busybox as the shell and init, the kernel's own
//! modules (from the same .deb), the test binaries and the programs the harness runs, each at its
//! host path with the shared libraries `ldd` names. No network and no disk: the suites build
//! their own network namespaces, as on the host. qemu runs under TCG (KVM fails nested here), so
//! the guest proves correctness, never speed. Results come back on the serial console, which is
//! copied to stdout, and are summed in cargo's own `test result:` format.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{cargo, is_root, output, root, status};

/// Debian packages the guest needs on the host: the emulator, a static shell for the guest,
/// and the tools that pack the initramfs and index the kernel's modules.
pub const APT_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "cpio", "kmod"];

/// The kernel CI boots: Debian 12's, the LTS most users run.
pub const CI_KERNEL: &str = "6.1";

/// The suites run in the guest unless `--suite` names others.
pub const DEFAULT_SUITES: &[&str] = &[UNIT_SUITE, "kernel", "datapath", "identity", "l7"];

/// Programs the harness runs, copied into the guest with their libraries. busybox provides the
/// rest (sh, mount, modprobe).
const GUEST_TOOLS: &[&str] = &[
    "ip",
    "ss",
    "nsenter",
    "setpriv",
    "bpftool",
    "curl",
    "kubectl",
    "iperf3",
    // The suites run Debian's, not whichever python3 is first on the PATH.
    "/usr/bin/python3",
];

/// Python's library and the Prometheus text parser some suites read `/metrics` with.
const GUEST_TREES: &[&str] = &[
    "/usr/lib/python3.11",
    "/usr/lib/python3/dist-packages/prometheus_client",
    "/usr/lib/python3/dist-packages/decorator.py",
];

/// How much longer the harness waits in the guest (`MESH_TEST_TIME_SCALE`): TCG is slower.
const GUEST_TIME_SCALE: u32 = 4;

/// Kernel modules loaded at boot: what the suites need and the kernel would not ask for itself.
/// (`tls` is left to the kernel's own request: the agent's probe must find it that way.)
const GUEST_MODULES: &[&str] = &["veth"];

/// Tests left out in the guest, by name, with why: each asserts a rate or a timing window that
/// emulation (TCG, several times slower, unevenly) cannot keep. They run on the host. The
/// summary counts them; nothing else is left out.
const GUEST_SKIPS: &[(&str, &str)] = &[
    (
        "a_route_change_applies_to_a_live_keep_alive_connection",
        "a request rate over a 3 s window",
    ),
    (
        "circuit_breaker_and_rate_limit_refuse_past_their_limits",
        "tokens refill while slow requests run",
    ),
    (
        "connection_limit_queues_pending_requests_then_overflows",
        "requests queued within one timeout",
    ),
    (
        "failing_endpoint_is_ejected_and_returns_at_the_sweep_after_the_backoff",
        "a sweep interval of a few hundred ms",
    ),
    (
        "hostile_node_files_are_refused_while_the_agent_keeps_serving",
        "/healthz within 200 ms while a 100,000-deep file is parsed (211 ms under TCG once)",
    ),
];

/// The longest a guest run may take before it is stopped and failed.
const GUEST_TIMEOUT: Duration = Duration::from_secs(40 * 60);

/// Marks the guest's own lines on the console, so they are never confused with a test's output.
const MARK: &str = "mesh-vm:";

/// A kernel ready to boot: its image, its release string and its extracted modules.
pub struct Kernel {
    /// `boot/vmlinuz-<release>` from the package.
    pub image: PathBuf,
    /// `uname -r` inside the guest.
    pub release: String,
    /// The extracted package, holding `lib/modules/<release>` (indexed by depmod).
    pub tree: PathBuf,
}

/// Finds the kernel `spec` names: a version (`6.1` takes Debian's newest
/// `linux-image-6.1.0-N-cloud-amd64`), a `.deb`, or a directory with a package already extracted.
/// Downloads and extracts into `target/vm/kernels` once.
pub fn kernel(spec: &str) -> Result<Kernel> {
    let store = root().join("target/vm/kernels");
    std::fs::create_dir_all(&store)?;
    let path = Path::new(spec);
    let tree = if path.is_dir() {
        path.to_path_buf()
    } else {
        let deb = if path.extension().is_some_and(|e| e == "deb") {
            path.canonicalize()
                .with_context(|| format!("no kernel package at {spec}"))?
        } else {
            download(spec, &store)?
        };
        let stem = deb
            .file_stem()
            .context("a kernel package's file name")?
            .to_string_lossy()
            .into_owned();
        let tree = store.join(stem);
        if !tree.join("boot").is_dir() {
            let partial = store.join("partial");
            let _ = std::fs::remove_dir_all(&partial);
            status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
            std::fs::rename(&partial, &tree)?;
        }
        tree
    };
    let image = std::fs::read_dir(tree.join("boot"))
        .with_context(|| format!("{} has no boot/: not a kernel package", tree.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no boot/vmlinuz-* in {}", tree.display()))?;
    let release = image
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_string()
        })
        .unwrap_or_default();
    let modules = tree.join("lib/modules").join(&release);
    if !modules.join("modules.dep").exists() {
        status(Command::new("depmod").arg("-b").arg(&tree).arg(&release))?;
    }
    Ok(Kernel {
        image,
        release,
        tree,
    })
}

/// Downloads Debian's newest cloud kernel package of `version` into `store` (once).
fn download(version: &str, store: &Path) -> Result<PathBuf> {
    let names = output(Command::new("apt-cache").args(["pkgnames", "linux-image-"]))
        .context("apt-cache pkgnames")?;
    let prefix = format!("linux-image-{version}.0-");
    let newest = names
        .lines()
        .filter_map(|n| {
            let abi = n.strip_prefix(&prefix)?.strip_suffix("-cloud-amd64")?;
            abi.parse::<u32>().ok().map(|abi| (abi, n.to_string()))
        })
        .max()
        .map(|(_, n)| n)
        .with_context(|| {
            format!(
                "Debian offers no linux-image-{version}.0-N-cloud-amd64 (apt-cache pkgnames); pass a .deb or an extracted kernel package instead"
            )
        })?;
    let have = std::fs::read_dir(store)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.extension().is_some_and(|e| e == "deb")
                && p.file_name()
                    .is_some_and(|f| f.to_string_lossy().starts_with(&format!("{newest}_")))
        });
    if let Some(deb) = have {
        return Ok(deb);
    }
    status(
        Command::new("apt-get")
            .current_dir(store)
            .args(["download", &newest]),
    )?;
    std::fs::read_dir(store)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with(&format!("{newest}_")))
        })
        .with_context(|| {
            format!(
                "apt-get download {newest} left no .deb in {}",
                store.display()
            )
        })
}

/// The suite name that stands for mesh-agent's own unit tests (kTLS, the kernel probes, the
/// handover's SCM_RIGHTS): they need a kernel too, and a kernel with TLS proves more of them.
pub const UNIT_SUITE: &str = "unit";

/// Builds the named test suites (`tests/tests/<suite>.rs`, or [`UNIT_SUITE`]) and returns their
/// executables, in the order named.
fn test_binaries(suites: &[String]) -> Result<Vec<(String, PathBuf)>> {
    let e2e: Vec<&String> = suites.iter().filter(|s| *s != UNIT_SUITE).collect();
    let mut builds = Vec::new();
    if suites.iter().any(|s| s == UNIT_SUITE) {
        builds.push(vec!["-p", "mesh-agent", "--lib"]);
    }
    if !e2e.is_empty() {
        let mut args = vec!["-p", "mesh-tests"];
        for s in &e2e {
            args.extend(["--test", s.as_str()]);
        }
        builds.push(args);
    }
    let mut found = Vec::new();
    for args in builds {
        let out = cargo()
            .current_dir(root())
            .args([
                "test",
                "--no-run",
                "--message-format=json-render-diagnostics",
            ])
            .args(&args)
            .stderr(Stdio::inherit())
            .output()?;
        if !out.status.success() {
            bail!("building the guest's test suites failed");
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let Some(exe) = msg["executable"]
                .as_str()
                .filter(|_| msg["profile"]["test"] == true)
            else {
                continue;
            };
            let kinds = &msg["target"]["kind"];
            let name = if kinds
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "lib"))
            {
                UNIT_SUITE
            } else {
                msg["target"]["name"].as_str().unwrap_or_default()
            };
            found.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    suites
        .iter()
        .map(|s| {
            found
                .iter()
                .find(|(n, _)| n == s)
                .cloned()
                .with_context(|| {
                    format!("no test suite {s:?}: name tests/tests/<suite>.rs or {UNIT_SUITE:?}")
                })
        })
        .collect()
}

/// The guest's root, built in a directory under `target/vm` and packed as an uncompressed cpio
/// (the kernel unpacks it faster than it would inflate gzip under emulation).
struct Guest {
    dir: PathBuf,
    copied: BTreeSet<PathBuf>,
}

impl Guest {
    fn new(dir: PathBuf) -> Result<Self> {
        let _ = std::fs::remove_dir_all(&dir);
        for d in [
            "bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "run", "root", "var",
        ] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        std::os::unix::fs::symlink("../run", dir.join("var/run"))?;
        Ok(Self {
            dir,
            copied: BTreeSet::new(),
        })
    }

    /// Where a host path lands in the guest.
    fn at(&self, host: &Path) -> PathBuf {
        self.dir.join(host.strip_prefix("/").unwrap_or(host))
    }

    fn write(&self, path: &str, text: &str) -> Result<()> {
        let p = self.dir.join(path);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(p, text)?;
        Ok(())
    }

    /// Copies a host file to the same path in the guest (following symlinks), without debug
    /// information when `strip` (the debug builds' DWARF would triple the initramfs).
    fn copy(&mut self, host: &Path, strip: bool) -> Result<()> {
        if !self.copied.insert(host.to_path_buf()) {
            return Ok(());
        }
        let to = self.at(host);
        if let Some(d) = to.parent() {
            std::fs::create_dir_all(d)?;
        }
        if strip {
            status(
                Command::new("objcopy")
                    .arg("--strip-debug")
                    .arg(host)
                    .arg(&to),
            )
        } else {
            std::fs::copy(host, &to)
                .map(|_| ())
                .with_context(|| format!("copy {} into the guest", host.display()))
        }
    }

    /// Copies a dynamic executable and every library `ldd` names, each at its host path.
    fn copy_program(&mut self, host: &Path, strip: bool) -> Result<()> {
        self.copy(host, strip)?;
        let Some(libs) = output(Command::new("ldd").arg(host)) else {
            return Ok(()); // static
        };
        for line in libs.lines() {
            let lib = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(lib) = lib.filter(|l| l.starts_with('/')) {
                self.copy(Path::new(lib), false)?;
            }
        }
        Ok(())
    }

    /// Packs the directory as a newc cpio archive.
    fn pack(&self, to: &Path) -> Result<()> {
        let file = std::fs::File::create(to)?;
        let mut find = Command::new("sh");
        find.current_dir(&self.dir)
            .args(["-c", "find . -mindepth 1 | cpio -o -H newc --quiet"])
            .stdout(file);
        status(&mut find)
    }
}

/// The guest's `/init`: mounts what the harness expects, loads the modules, runs each suite and
/// reports its exit status on the console, then powers off.
fn init_script(kernel: &Kernel, suites: &[(String, PathBuf)], args: &[String]) -> String {
    let config = std::fs::read_to_string(
        kernel
            .tree
            .join("boot")
            .join(format!("config-{}", kernel.release)),
    )
    .unwrap_or_default();
    let has_tls = config
        .lines()
        .any(|l| l == "CONFIG_TLS=m" || l == "CONFIG_TLS=y");
    // BTF and ftrace's direct calls: what an `fexit` program needs to load and attach.
    let has_fexit = [
        "CONFIG_DEBUG_INFO_BTF=y",
        "CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS=y",
    ]
    .iter()
    .all(|want| config.lines().any(|l| l == *want));
    let tests_dir = root().join("tests");
    let mut s = format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
ln -sf /bin/busybox /sbin/modprobe
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs shm /dev/shm
# No tmpfs over /tmp or /run: the initramfs is in memory and writable already, and a checkout
# under /tmp (as CI's may be) would be hidden by one.
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
for m in {modules}; do modprobe $m || echo "{MARK} cannot load module $m"; done
ip link set lo up
ulimit -n 1048576
export MESH_TEST_TIME_SCALE={scale}
# A kernel built with CONFIG_TLS: the kTLS tests must see the kernel path, not skip it.
export MESH_TEST_EXPECT_KTLS={expect_ktls}
# One that can load fexit programs: the loopback bypass must be paced by its readers.
export MESH_TEST_EXPECT_PACED={expect_paced}
echo "{MARK} kernel $(uname -r) ($(nproc) cpus)"
"#,
        modules = GUEST_MODULES.join(" "),
        scale = GUEST_TIME_SCALE,
        expect_ktls = u8::from(has_tls),
        expect_paced = u8::from(has_fexit),
    );
    let skips: String = GUEST_SKIPS
        .iter()
        .map(|(t, _)| format!(" --skip {t}"))
        .collect();
    for (name, exe) in suites {
        s.push_str(&format!(
            "echo \"{MARK} suite {name} start\"\ncd {dir} && RUST_BACKTRACE=1 {exe} {args}{skips}\necho \"{MARK} suite {name} exit $?\"\n",
            dir = tests_dir.display(),
            exe = exe.display(),
            args = args.join(" "),
        ));
    }
    s.push_str(&format!("echo \"{MARK} done\"\npoweroff -f\n"));
    s
}

/// What one guest run showed: per suite, cargo's counts and the exit status.
#[derive(Default, Debug)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
    exits: Vec<(String, i32)>,
    done: bool,
}

impl Tally {
    /// Reads one console line.
    fn line(&mut self, line: &str) {
        if let Some(rest) = line.trim().strip_prefix("test result: ") {
            let count = |what: &str| {
                rest.split(';')
                    .find_map(|p| {
                        p.trim()
                            .strip_suffix(what)?
                            .trim()
                            .rsplit(' ')
                            .next()?
                            .parse::<u64>()
                            .ok()
                    })
                    .unwrap_or(0)
            };
            self.passed += count("passed");
            self.failed += count("failed");
            self.ignored += count("ignored");
        } else if let Some(rest) = line.trim().strip_prefix(MARK) {
            let words: Vec<&str> = rest.split_whitespace().collect();
            match words.as_slice() {
                ["suite", name, "exit", code] => {
                    self.exits
                        .push((name.to_string(), code.parse().unwrap_or(-1)));
                }
                ["done"] => self.done = true,
                _ => {}
            }
        }
    }
}

/// Runs `suites` in a guest booted from `spec`, with `args` for each test binary.
pub fn test(spec: &str, suites: &[String], args: &[String]) -> Result<()> {
    if !is_root() {
        bail!(
            "the guest image copies root-only tools and the suites need root inside it: run `sudo cargo xtask test --kernel {spec}`"
        );
    }
    let kernel = kernel(spec)?;
    let binaries = test_binaries(suites)?;
    let work = root().join("target/vm");
    let mut guest = Guest::new(work.join("root"))?;
    guest.copy(Path::new("/bin/busybox"), false)?;
    // The kernel's modules, at the path modprobe reads.
    std::fs::create_dir_all(guest.dir.join("lib"))?;
    status(
        Command::new("cp")
            .arg("-a")
            .arg(kernel.tree.join("lib/modules"))
            .arg(guest.dir.join("lib")),
    )?;
    // The agent, the test apps, the eBPF objects: what `bin_dir()` holds next to the suites.
    let bins = crate::root().join("target/debug");
    for e in std::fs::read_dir(&bins)? {
        let p = e?.path();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if p.is_file() && name.starts_with("mesh-") && !name.ends_with(".d") {
            let elf = name.ends_with(".o");
            guest.copy(&p, !elf)?;
        }
    }
    for (_, exe) in &binaries {
        guest.copy_program(exe, true)?;
    }
    for tool in GUEST_TOOLS {
        let path = if tool.starts_with('/') {
            Some(PathBuf::from(tool)).filter(|p| p.exists())
        } else {
            output(Command::new("sh").args(["-c", &format!("command -v {tool}")]))
                .map(|p| PathBuf::from(p.trim()))
        }
        .with_context(|| format!("{tool} is not installed: run `cargo xtask setup`"))?;
        let real = path.canonicalize()?;
        guest.copy_program(&real, false)?;
        if real != path {
            guest.copy(&path, false)?;
        }
    }
    // Data files the suites read from their source tree.
    for tree in GUEST_TREES {
        let to = guest.at(Path::new(tree));
        std::fs::create_dir_all(to.parent().context("a tree's parent")?)?;
        status(Command::new("cp").arg("-a").arg(tree).arg(&to))?;
    }
    let tests_dir = guest.at(&root().join("tests"));
    std::fs::create_dir_all(&tests_dir)?;
    status(
        Command::new("cp")
            .arg("-a")
            .arg(root().join("tests/corpus"))
            .arg(&tests_dir),
    )?;
    guest.write(
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    guest.write("etc/group", "root:x:0:\nnogroup:x:65534:\n")?;
    guest.write("etc/hosts", "127.0.0.1 localhost\n::1 localhost\n")?;
    guest.write("etc/nsswitch.conf", "hosts: files\n")?;
    let init = init_script(&kernel, &binaries, args);
    guest.write("init", &init)?;
    status(Command::new("chmod").arg("755").arg(guest.dir.join("init")))?;
    let initrd = work.join("initrd.cpio");
    guest.pack(&initrd)?;
    let size = std::fs::metadata(&initrd)?.len();
    println!(
        "booting {} in qemu (TCG) with a {} MB initramfs: suites {}",
        kernel.release,
        size >> 20,
        suites.join(", ")
    );
    boot(&kernel, &initrd, size)
}

/// Boots the guest, copies its console to stdout, and sums what the suites reported.
fn boot(kernel: &Kernel, initrd: &Path, initrd_size: u64) -> Result<()> {
    // The initramfs lives in guest memory beside the suites' own use.
    let memory_mb = 3072 + (initrd_size >> 20) * 2;
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2"])
        .args(["-m", &memory_mb.to_string()])
        .arg("-kernel")
        .arg(&kernel.image)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet loglevel=4",
            "-nographic",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start qemu-system-x86_64: run `cargo xtask setup`")?;
    let started = Instant::now();
    let stdout = qemu.stdout.take().context("qemu's console")?;
    let pid = qemu.id();
    let watchdog = std::thread::spawn(move || {
        while started.elapsed() < GUEST_TIMEOUT {
            std::thread::sleep(Duration::from_secs(5));
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return false;
            }
        }
        let _ = Command::new("kill").arg(pid.to_string()).status();
        true
    });
    let mut tally = Tally::default();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap_or_default();
        println!("{line}");
        tally.line(&line);
    }
    let st = qemu.wait()?;
    let timed_out = watchdog.join().unwrap_or(false);
    println!(
        "\nguest {}: test result: {}. {} passed; {} failed; {} ignored; {} left out by name (xtask/src/vm.rs: GUEST_SKIPS); finished in {:.0} s",
        kernel.release,
        if tally.failed == 0 && tally.done {
            "ok"
        } else {
            "FAILED"
        },
        tally.passed,
        tally.failed,
        tally.ignored,
        GUEST_SKIPS.len(),
        started.elapsed().as_secs_f64()
    );
    if timed_out {
        bail!(
            "the guest ran past {} min and was stopped",
            GUEST_TIMEOUT.as_secs() / 60
        );
    }
    if !tally.done {
        bail!("the guest stopped before its suites finished (qemu: {st}); its console is above");
    }
    let bad: Vec<_> = tally.exits.iter().filter(|(_, c)| *c != 0).collect();
    if !bad.is_empty() || tally.failed > 0 {
        bail!("suites failed in the guest: {bad:?}");
    }
    if tally.passed == 0 {
        bail!("no test ran in the guest");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tally_reads_cargo_summaries_and_the_guest_marks() {
        let mut t = Tally::default();
        for l in [
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 2.1s",
            "test result: FAILED. 7 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
            "mesh-vm: suite kernel exit 0",
            "mesh-vm: suite l7 exit 101",
            "mesh-vm: done",
        ] {
            t.line(l);
        }
        assert_eq!((t.passed, t.failed, t.ignored), (10, 2, 1));
        assert_eq!(t.exits, vec![("kernel".into(), 0), ("l7".into(), 101)]);
        assert!(t.done);
    }
}
