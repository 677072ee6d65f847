//! The kernel's side of kTLS: the `tls` upper-layer protocol, installing a connection's keys,
//! and the record-typed socket calls. Every system call kTLS makes is here.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    sync::OnceLock,
};

/// TLS record content types (RFC 8446 §5.1).
pub const ALERT: u8 = 21;
pub const HANDSHAKE: u8 = 22;
pub const APPLICATION_DATA: u8 = 23;

/// Errors from kTLS.
#[derive(Debug, thiserror::Error)]
pub enum KtlsError {
    /// The kernel has no TLS module.
    #[error("the kernel has no TLS support (CONFIG_TLS, module `tls`): {0}; HBONE stays on rustls")]
    Unsupported(io::Error),
    /// A socket option was refused.
    #[error("kTLS: {what}: {source}")]
    Socket {
        /// The step that failed.
        what: &'static str,
        /// The kernel's answer.
        source: io::Error,
    },
    /// The negotiated cipher has no kernel counterpart.
    #[error("kTLS: the kernel cannot take the cipher {0}; this connection stays on rustls")]
    Cipher(String),
    /// rustls would not give up the connection's secrets.
    #[error("kTLS: rustls kept the secrets: {0}")]
    Extract(rustls::Error),
}

/// `TCP_ULP` (linux/tcp.h).
const TCP_ULP: libc::c_int = 31;

/// Whether this kernel offers kTLS, probed once on a loopback connection; the error says why
/// not.
pub fn available() -> Result<(), &'static KtlsError> {
    static PROBE: OnceLock<Result<(), KtlsError>> = OnceLock::new();
    PROBE.get_or_init(probe).as_ref().copied()
}

/// Attaches the `tls` ULP to a loopback connection: what [`available`] remembers.
pub fn probe() -> Result<(), KtlsError> {
    let socket = |what| move |source| KtlsError::Socket { what, source };
    let listener =
        std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(socket("probe listener"))?;
    let addr = listener.local_addr().map_err(socket("probe listener"))?;
    let client = std::net::TcpStream::connect(addr).map_err(socket("probe connect"))?;
    let _server = listener.accept().map_err(socket("probe accept"))?;
    attach_ulp(client.as_fd())
}

fn setsockopt(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: &[u8],
) -> io::Result<()> {
    // SAFETY: a valid socket and a buffer of the length given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Puts the `tls` upper-layer protocol on an established TCP socket.
pub fn attach_ulp(fd: BorrowedFd<'_>) -> Result<(), KtlsError> {
    match setsockopt(fd, libc::IPPROTO_TCP, TCP_ULP, b"tls") {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Err(KtlsError::Unsupported(e)),
        Err(source) => Err(KtlsError::Socket {
            what: "attach the tls ULP",
            source,
        }),
    }
}

/// The record-typed socket calls: the kernel names a received record's type, and takes a sent
/// one's, in a `SOL_TLS` control message.
pub mod sys {
    use std::{
        io,
        os::fd::{AsRawFd, BorrowedFd},
    };

    use super::keys::SOL_TLS;

    /// `TLS_SET_RECORD_TYPE`, `TLS_GET_RECORD_TYPE` (linux/tls.h).
    const TLS_SET_RECORD_TYPE: libc::c_int = 1;
    const TLS_GET_RECORD_TYPE: libc::c_int = 2;

    /// Room for one control message of one byte, aligned as `cmsghdr` needs.
    #[repr(C, align(8))]
    struct Control([u8; 32]);

    /// Reads from one record; returns the bytes read and the record's content type.
    pub fn recv_record(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, u8)> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut control = Control([0; 32]);
        // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = control.0.len();
        // SAFETY: a valid socket and a msghdr whose buffers are live and sized as stated.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &raw mut msg, 0) };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        let mut kind = super::APPLICATION_DATA;
        // SAFETY: walking the control messages the kernel just wrote, within msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
            while !c.is_null() {
                if (*c).cmsg_level == SOL_TLS && (*c).cmsg_type == TLS_GET_RECORD_TYPE {
                    kind = *libc::CMSG_DATA(c);
                }
                c = libc::CMSG_NXTHDR(&raw const msg, c);
            }
        }
        Ok((n, kind))
    }

    /// Sends `data` as one record of content type `kind`.
    pub fn send_record(fd: BorrowedFd<'_>, kind: u8, data: &[u8]) -> io::Result<usize> {
        let mut iov = libc::iovec {
            iov_base: data.as_ptr().cast_mut().cast(),
            iov_len: data.len(),
        };
        let mut control = Control([0; 32]);
        // SAFETY: as in `recv_record`; the control message is built within `control`.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &raw mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.0.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(1) as usize;
            let c = libc::CMSG_FIRSTHDR(&raw const msg);
            (*c).cmsg_level = SOL_TLS;
            (*c).cmsg_type = TLS_SET_RECORD_TYPE;
            (*c).cmsg_len = libc::CMSG_LEN(1) as usize;
            *libc::CMSG_DATA(c) = kind;
            let n = libc::sendmsg(fd.as_raw_fd(), &raw const msg, 0);
            usize::try_from(n).map_err(|_| io::Error::last_os_error())
        }
    }
}

/// Installing the keys, tested against the kernel headers.
pub mod keys {
    use std::os::fd::BorrowedFd;

    use rustls::ConnectionTrafficSecrets;

    use super::{KtlsError, setsockopt};

    /// `SOL_TLS` (linux/socket.h).
    pub const SOL_TLS: libc::c_int = 282;
    /// `TLS_TX`, `TLS_RX` (linux/tls.h).
    const TLS_TX: libc::c_int = 1;
    const TLS_RX: libc::c_int = 2;
    /// `TLS_1_3_VERSION` (linux/tls.h).
    const TLS_1_3: u16 = 0x0304;
    /// Cipher types (linux/tls.h).
    const AES_GCM_128: u16 = 51;
    const AES_GCM_256: u16 = 52;
    const CHACHA20_POLY1305: u16 = 54;

    /// The kernel's `tls12_crypto_info_*` record for one direction of a TLS 1.3 connection at
    /// record sequence `seq`. TLS 1.3 derives each record's nonce from a 12-byte IV; the kernel
    /// takes it as a 4-byte salt and an 8-byte IV for AES-GCM, and whole for ChaCha20-Poly1305.
    pub fn crypto_info(seq: u64, secrets: &ConnectionTrafficSecrets) -> Result<Vec<u8>, KtlsError> {
        let (cipher, key, iv): (u16, &[u8], &[u8]) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                (AES_GCM_128, key.as_ref(), iv.as_ref())
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                (AES_GCM_256, key.as_ref(), iv.as_ref())
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (CHACHA20_POLY1305, key.as_ref(), iv.as_ref())
            }
            _ => {
                return Err(KtlsError::Cipher(
                    "other than AES-GCM or ChaCha20-Poly1305".into(),
                ));
            }
        };
        let mut info = Vec::with_capacity(64);
        info.extend_from_slice(&TLS_1_3.to_ne_bytes());
        info.extend_from_slice(&cipher.to_ne_bytes());
        if cipher == CHACHA20_POLY1305 {
            // iv[12], key[32], salt[0], rec_seq[8]
            info.extend_from_slice(iv);
            info.extend_from_slice(key);
        } else {
            // iv[8], key[16 or 32], salt[4], rec_seq[8]
            info.extend_from_slice(&iv[4..]);
            info.extend_from_slice(key);
            info.extend_from_slice(&iv[..4]);
        }
        info.extend_from_slice(&seq.to_be_bytes());
        Ok(info)
    }

    /// Moves both directions of a TLS 1.3 connection on `fd`, which carries the `tls` ULP, into
    /// the kernel. The caller must hold no buffered TLS data of the connection, and must use
    /// `fd` directly from then on.
    pub fn enable(fd: BorrowedFd<'_>, secrets: &rustls::ExtractedSecrets) -> Result<(), KtlsError> {
        let tx = crypto_info(secrets.tx.0, &secrets.tx.1)?;
        let rx = crypto_info(secrets.rx.0, &secrets.rx.1)?;
        setsockopt(fd, SOL_TLS, TLS_TX, &tx).map_err(|source| KtlsError::Socket {
            what: "install the send keys",
            source,
        })?;
        setsockopt(fd, SOL_TLS, TLS_RX, &rx).map_err(|source| KtlsError::Socket {
            what: "install the receive keys",
            source,
        })
    }
}
