//! Kernel tests: the built object loads into the real kernel, and every name `mesh-common`
//! promises exists in it. Needs root; never skipped.

use std::{fs::File, process::Command};

use anyhow::{Context, Result, bail};
use aya::{
    EbpfLoader,
    maps::{Map, MapData, SockHash},
    programs::{CgroupAttachMode, Program},
};
use mesh_common::{maps, programs};
use mesh_tests::{artifact, cgroup2_root, ensure_bpffs};

/// Scratch cgroup, netns and bpffs directory, removed on drop.
struct Scratch {
    cgroup: std::path::PathBuf,
    netns: String,
    pins: std::path::PathBuf,
}

impl Scratch {
    fn new(tag: &str) -> Result<Self> {
        ensure_bpffs()?;
        let id = format!("mk{}{tag}", std::process::id());
        let cgroup = cgroup2_root()?.join(format!("mesh-kernel-{id}"));
        std::fs::create_dir_all(&cgroup)?;
        let st = Command::new("ip").args(["netns", "add", &id]).status()?;
        if !st.success() {
            bail!("ip netns add {id} failed");
        }
        let pins = std::path::PathBuf::from("/sys/fs/bpf").join(&id);
        std::fs::create_dir_all(&pins)?;
        Ok(Self {
            cgroup,
            netns: id,
            pins,
        })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pins);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

#[test]
fn every_name_exists_and_every_program_loads_and_attaches() -> Result<()> {
    let scratch = Scratch::new("a")?;
    let object = std::fs::read(artifact("mesh-ebpf.o")?)?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&scratch.pins)
        .load(&object)
        .context("load object")?;

    let names: Vec<String> = ebpf.maps().map(|(n, _)| n.to_string()).collect();
    for m in maps::ALL {
        assert!(
            names.iter().any(|n| n == m),
            "map {m} missing; object has {names:?}"
        );
        // Pinned by name, so a restarted agent adopts it.
        assert!(scratch.pins.join(m).exists(), "map {m} not pinned");
    }
    // aya-log's ring of rare events and the constants its format strings live in (`.rodata`):
    // deliberately not pinned, each agent has its own.
    for own in ["AYA_LOGS", ".rodata"] {
        assert!(names.iter().any(|n| n == own), "{own} missing: {names:?}");
        assert!(!scratch.pins.join(own).exists(), "{own} is pinned");
    }
    // The compiler may add constant pools beside `.rodata` (`.rodata.cst8`): unpinned too.
    let unnamed: Vec<&String> = names
        .iter()
        .filter(|n| !maps::ALL.contains(&n.as_str()) && *n != "AYA_LOGS")
        .collect();
    assert!(
        unnamed.iter().all(|n| n.starts_with(".rodata")),
        "object has maps mesh-common does not name: {unnamed:?}"
    );
    for n in &unnamed {
        assert!(!scratch.pins.join(n).exists(), "{n} is pinned");
    }
    let progs: Vec<String> = ebpf.programs().map(|(n, _)| n.to_string()).collect();
    // Besides those, the two optional reader counters of the paced loopback bypass.
    assert_eq!(progs.len(), programs::ALL.len() + 2, "{progs:?}");
    for optional in [programs::LOOP_READ, programs::LOOP_READ_INNER] {
        assert!(progs.iter().any(|p| p == optional), "{optional}: {progs:?}");
    }

    let cgroup = File::open(&scratch.cgroup)?;
    let netns = File::open(format!("/var/run/netns/{}", scratch.netns))?;
    // The splice verdict attaches to its sock hash.
    let splice_sources: SockHash<MapData, u64> = SockHash::try_from(
        ebpf.take_map(maps::SPLICE_SOURCES)
            .context("SPLICE_SOURCES")?,
    )?;
    // The loopback bypass's message verdict attaches to its sock hash.
    let loop_socks: SockHash<MapData, mesh_common::LoopKey> =
        SockHash::try_from(ebpf.take_map(maps::LOOP_SOCKS).context("LOOP_SOCKS")?)?;
    for name in programs::ALL {
        let prog = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing; object has {progs:?}"))?;
        match prog {
            Program::CgroupSockAddr(p) => {
                p.load()
                    .with_context(|| format!("verifier rejected {name}"))?;
                p.attach(&cgroup, CgroupAttachMode::Single)?;
            }
            Program::SockOps(p) => {
                p.load()
                    .with_context(|| format!("verifier rejected {name}"))?;
                p.attach(&cgroup, CgroupAttachMode::Single)?;
            }
            Program::SkLookup(p) => {
                p.load()
                    .with_context(|| format!("verifier rejected {name}"))?;
                p.attach(&netns)?;
            }
            Program::SkSkb(p) => {
                p.load()
                    .with_context(|| format!("verifier rejected {name}"))?;
                p.attach(splice_sources.fd())?;
            }
            Program::SkMsg(p) => {
                p.load()
                    .with_context(|| format!("verifier rejected {name}"))?;
                p.attach(loop_socks.fd())?;
            }
            other => bail!("{name} has unexpected type {:?}", other.prog_type()),
        }
    }
    // The map types the agent relies on.
    assert!(matches!(ebpf.map(maps::ORIG_DST), Some(Map::LruHashMap(_))));
    assert!(matches!(
        ebpf.map(maps::ORIG_DST_BY_COOKIE),
        Some(Map::LruHashMap(_))
    ));
    assert!(matches!(
        ebpf.map(maps::INBOUND_SOCKS),
        Some(Map::SockHash(_))
    ));
    assert!(matches!(
        ebpf.map(maps::POD_STATS),
        Some(Map::PerCpuHashMap(_))
    ));
    assert!(matches!(
        ebpf.map(maps::INBOUND_STATS),
        Some(Map::PerCpuHashMap(_))
    ));
    assert!(matches!(
        ebpf.map(maps::EXCLUDED_PORTS),
        Some(Map::HashMap(_))
    ));
    assert!(matches!(
        ebpf.map(maps::SPLICE_TARGETS),
        Some(Map::SockHash(_))
    ));
    assert!(matches!(
        ebpf.map(maps::LOOP_MODES),
        Some(Map::LruHashMap(_))
    ));
    assert!(matches!(ebpf.map(maps::LOOP_ENABLED), Some(Map::Array(_))));
    for paced in [maps::LOOP_PACE, maps::LOOP_READ] {
        assert!(
            matches!(ebpf.map(paced), Some(Map::LruHashMap(_))),
            "{paced}"
        );
    }
    assert!(matches!(
        ebpf.map(maps::SPLICE_PEERS),
        Some(Map::HashMap(_))
    ));
    drop(ebpf);
    Ok(())
}

#[test]
fn pinned_maps_are_reused_by_a_second_load() -> Result<()> {
    let scratch = Scratch::new("b")?;
    let object = std::fs::read(artifact("mesh-ebpf.o")?)?;
    let id = |ebpf: &aya::Ebpf| -> Result<u32> {
        let m = ebpf.map(maps::ORIG_DST).context("map")?;
        let Map::LruHashMap(d) = m else {
            bail!("wrong type")
        };
        Ok(d.info()?.id())
    };
    let first = EbpfLoader::new()
        .default_map_pin_directory(&scratch.pins)
        .load(&object)?;
    let a = id(&first)?;
    let second = EbpfLoader::new()
        .default_map_pin_directory(&scratch.pins)
        .load(&object)?;
    assert_eq!(
        id(&second)?,
        a,
        "second load must adopt the pinned map, not create one"
    );
    Ok(())
}

#[test]
fn a_pinned_map_of_another_layout_is_refused_not_adopted() -> Result<()> {
    let scratch = Scratch::new("c")?;
    let maps_dir = scratch.pins.join("maps");
    std::fs::create_dir_all(&maps_dir)?;
    // What an agent of another version might have left: the name is ours, the value is not.
    let pin = maps_dir.join(maps::ORIG_DST);
    let st = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&pin)
        .args([
            "type",
            "lru_hash",
            "key",
            "8",
            "value",
            "4",
            "entries",
            "64",
            "name",
            "old_orig_dst",
        ])
        .status()?;
    if !st.success() {
        bail!("bpftool map create failed");
    }
    let err = mesh_agent::capture::bpf::Dataplane::load(&artifact("mesh-ebpf.o")?, &scratch.pins)
        .err()
        .context("a map of another layout must not be adopted")?;
    let text = err.to_string();
    assert!(
        text.contains("another version")
            && text.contains("value 4 B")
            && text.contains("uninstall"),
        "{text}"
    );
    assert!(pin.exists(), "the old map is left as it was");
    // The same load with the old map gone creates and pins ours.
    std::fs::remove_file(&pin)?;
    mesh_agent::capture::bpf::Dataplane::load(&artifact("mesh-ebpf.o")?, &scratch.pins)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(pin.exists());
    Ok(())
}
