//! Kernel TLS, where the kernel has it: after rustls's handshake, the record layer of a TLS 1.3
//! connection can move into the kernel (the `tls` upper-layer protocol, then `TLS_TX`/`TLS_RX`
//! with the traffic secrets), so bulk data is encrypted without a copy through userspace.
//!
//! This is optional and detected at run time: kernels built without `CONFIG_TLS` refuse the
//! upper-layer protocol with ENOENT, and then everything stays on rustls. What is here: the
//! detection, and turning extracted secrets into the kernel's `crypto_info` records. Not yet:
//! handing HBONE connections over (which needs a handshake that reads whole records only, so
//! rustls holds no ciphertext at the switch).

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
    sync::OnceLock,
};

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
}

/// `TCP_ULP` (linux/tcp.h).
const TCP_ULP: libc::c_int = 31;

/// Whether this kernel offers kTLS, probed once on a loopback connection; the error says why
/// not.
pub fn available() -> Result<(), &'static KtlsError> {
    static PROBE: OnceLock<Result<(), KtlsError>> = OnceLock::new();
    PROBE.get_or_init(probe).as_ref().copied()
}

fn probe() -> Result<(), KtlsError> {
    let socket = |what| move |source| KtlsError::Socket { what, source };
    let listener =
        std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(socket("probe listener"))?;
    let addr = listener.local_addr().map_err(socket("probe listener"))?;
    let client = std::net::TcpStream::connect(addr).map_err(socket("probe connect"))?;
    let _server = listener.accept().map_err(socket("probe accept"))?;
    use std::os::fd::AsFd;
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
fn attach_ulp(fd: BorrowedFd<'_>) -> Result<(), KtlsError> {
    match setsockopt(fd, libc::IPPROTO_TCP, TCP_ULP, b"tls") {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Err(KtlsError::Unsupported(e)),
        Err(source) => Err(KtlsError::Socket {
            what: "attach the tls ULP",
            source,
        }),
    }
}

/// Installing the keys: written and tested against the kernel headers, used once HBONE hands
/// connections over.
pub mod keys {
    #![expect(
        dead_code,
        reason = "the HBONE hand-over that calls these is still to come (see the module doc)"
    )]

    use std::os::fd::BorrowedFd;

    use rustls::ConnectionTrafficSecrets;

    use super::{KtlsError, attach_ulp, setsockopt};

    /// `SOL_TLS` (linux/socket.h).
    const SOL_TLS: libc::c_int = 282;
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

    /// Moves both directions of a TLS 1.3 connection on `fd` into the kernel. The caller must hold
    /// no buffered TLS data of the connection, and must use `fd` directly from then on.
    pub fn enable(fd: BorrowedFd<'_>, secrets: &rustls::ExtractedSecrets) -> Result<(), KtlsError> {
        let tx = crypto_info(secrets.tx.0, &secrets.tx.1)?;
        let rx = crypto_info(secrets.rx.0, &secrets.rx.1)?;
        attach_ulp(fd)?;
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

#[cfg(test)]
mod tests {
    use rustls::ConnectionTrafficSecrets;

    use super::{KtlsError, keys::crypto_info, probe};

    /// The records match linux/tls.h byte for byte: header, then for AES-GCM the IV's last 8
    /// bytes, the key, the IV's first 4 (the salt) and the big-endian sequence number; for
    /// ChaCha20 the whole IV first.
    #[test]
    fn crypto_info_layout_matches_the_kernel_headers() {
        let iv: [u8; 12] = std::array::from_fn(|i| 0xa0 + i as u8);
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let secrets = ConnectionTrafficSecrets::Aes256Gcm {
            key: rustls::crypto::cipher::AeadKey::from(key),
            iv: rustls::crypto::cipher::Iv::from(iv),
        };
        let info = crypto_info(0x0102, &secrets).expect("AES-256-GCM");
        // struct tls12_crypto_info_aes_gcm_256: 4 + 8 + 32 + 4 + 8 bytes.
        assert_eq!(info.len(), 56);
        assert_eq!(&info[..4], &[0x04, 0x03, 52, 0]);
        assert_eq!(&info[4..12], &iv[4..]);
        assert_eq!(&info[12..44], &key);
        assert_eq!(&info[44..48], &iv[..4]);
        assert_eq!(&info[48..], &[0, 0, 0, 0, 0, 0, 1, 2]);

        let chacha = ConnectionTrafficSecrets::Chacha20Poly1305 {
            key: rustls::crypto::cipher::AeadKey::from([7u8; 32]),
            iv: rustls::crypto::cipher::Iv::from(iv),
        };
        let info = crypto_info(1, &chacha).expect("ChaCha20");
        // struct tls12_crypto_info_chacha20_poly1305: 4 + 12 + 32 + 0 + 8 bytes.
        assert_eq!(info.len(), 56);
        assert_eq!(&info[4..16], &iv);
    }

    /// On a kernel without the `tls` module the probe says so, naming CONFIG_TLS, and does not
    /// fail in any other way; on one with it, the probe passes.
    #[test]
    fn probe_matches_whether_the_kernel_has_tls() {
        let probed = probe();
        // Asked for, the kernel loads the module if it can: look only afterwards.
        let has_tls = std::path::Path::new("/sys/module/tls").exists();
        match probed {
            Ok(()) => assert!(has_tls, "the probe passed without a tls module"),
            Err(KtlsError::Unsupported(e)) => {
                assert!(!has_tls, "tls module present, yet: {e}");
                let msg = KtlsError::Unsupported(e).to_string();
                assert!(
                    msg.contains("CONFIG_TLS") && msg.contains("rustls"),
                    "{msg}"
                );
            }
            Err(e) => panic!("the probe failed otherwise: {e}"),
        }
    }
}
