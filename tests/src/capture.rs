//! Packet capture on an interface, and TCP segments from the frames.

use std::{os::fd::AsRawFd, path::Path, sync::atomic::Ordering};

use anyhow::Result;

use crate::*;

/// Raw frames seen on one interface of a netns (an `AF_PACKET` socket), to assert on what
/// crosses the wire. Frames are collected on a thread until [`Capture::stop`].
#[derive(Debug)]
pub struct Capture {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<Vec<Vec<u8>>>>,
}

impl Capture {
    /// Starts capturing on `ifname` inside `netns`.
    pub fn start(netns: &Path, ifname: &str) -> Result<Self> {
        use std::os::fd::{FromRawFd, OwnedFd};
        let ifname = std::ffi::CString::new(ifname)?;
        let fd = in_netns(netns, move || -> std::io::Result<OwnedFd> {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket(2); the result is checked.
            let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
            if raw < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: `raw` is a fresh descriptor we own.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: `ifname` is a valid C string.
            let index = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
            if index == 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: zeroed sockaddr_ll is valid; the fields we need are set below.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = index as i32;
            // SAFETY: `sll` is a valid sockaddr_ll of the size given.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const sll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            let rcvbuf: libc::c_int = 32 << 20;
            // SAFETY: valid option values of the right sizes.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const tv).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&raw const rcvbuf).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                );
            }
            Ok(fd)
        })??;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 256 * 1024];
            while !flag.load(Ordering::Relaxed) {
                // SAFETY: `buf` is writable for its length.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    frames.push(buf[..n as usize].to_vec());
                }
            }
            frames
        });
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops and returns every frame seen.
    pub fn stop(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

/// One TCP segment of a captured frame.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Whether it was IPv6.
    pub ipv6: bool,
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// TCP payload.
    pub payload: Vec<u8>,
}

/// The TCP segments among Ethernet frames, IPv4 and IPv6 (without extension headers, which
/// nothing here sends); everything else is skipped.
pub fn tcp_segments(frames: &[Vec<u8>]) -> Vec<Segment> {
    frames
        .iter()
        .filter_map(|f| {
            // (IP header length, end of the IP packet) by EtherType.
            let (ipv6, ip_len, end) = match f.get(12..14)? {
                [0x08, 0x00] if f.get(23) == Some(&6) => {
                    let ihl = usize::from(f.get(14)? & 0x0f) * 4;
                    let total = usize::from(u16::from_be_bytes([*f.get(16)?, *f.get(17)?]));
                    (false, ihl, 14 + total)
                }
                [0x86, 0xdd] if f.get(20) == Some(&6) => {
                    let payload = usize::from(u16::from_be_bytes([*f.get(18)?, *f.get(19)?]));
                    (true, 40, 14 + 40 + payload)
                }
                _ => return None,
            };
            let tcp = 14 + ip_len;
            if f.len() < tcp + 20 {
                return None;
            }
            let doff = usize::from(f[tcp + 12] >> 4) * 4;
            let end = end.min(f.len());
            let start = (tcp + doff).min(end);
            Some(Segment {
                ipv6,
                src_port: u16::from_be_bytes([f[tcp], f[tcp + 1]]),
                dst_port: u16::from_be_bytes([f[tcp + 2], f[tcp + 3]]),
                payload: f[start..end].to_vec(),
            })
        })
        .collect()
}
