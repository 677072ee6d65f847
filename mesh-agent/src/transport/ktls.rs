//! Kernel TLS, where the kernel has it: after rustls's handshake, the record layer of a TLS 1.3
//! connection moves into the kernel (the `tls` upper-layer protocol, then `TLS_TX`/`TLS_RX`
//! with the traffic secrets), so HBONE's bytes are encrypted without a copy through userspace.
//!
//! Optional and decided once at start ([`configure`]): kernels built without `CONFIG_TLS`
//! refuse the upper-layer protocol with ENOENT, and then every connection stays on rustls,
//! exactly as when `--ktls=false`. The hand-over, per connection:
//! 1. the handshake reads through [`Corked`], which hands rustls whole TLS records and pauses
//!    after each, so the handshake stops at the record that completes it and rustls holds no
//!    ciphertext of the next one (what it holds would be lost: the kernel starts from the
//!    socket's queue);
//! 2. [`hand_over`] attaches the `tls` ULP (a refusal keeps rustls), takes any plaintext rustls
//!    already decrypted, extracts the secrets with their record sequence numbers and installs
//!    them;
//! 3. [`KernelStream`] reads with `recvmsg`, since the kernel passes non-data records (alerts,
//!    post-handshake messages) up with their type in a control message, and writes plainly.
//!
//! Our servers send no session tickets while kTLS is on, so our clients never see a
//! post-handshake message; a peer's tickets are skipped. A key update cannot be followed (the
//! kernel would need new keys from a rustls state that is gone): the connection ends and the
//! pool opens another.

use std::{
    io,
    os::fd::AsFd,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll, ready},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf},
    net::TcpStream,
};

pub mod kernel;

use kernel::{ALERT, APPLICATION_DATA, HANDSHAKE, attach_ulp, keys, sys};
pub use kernel::{KtlsError, available};

use crate::transport::relay::{SCRATCH, with_scratch};

/// Decides whether kTLS is used: `wanted` (the `--ktls` flag) and the kernel has it. Returns
/// the decision and, when the kernel lacks it, why. The decision is configuration: the agent
/// passes it to the certificate manager and the HBONE pool, so nothing reads it from a global.
pub fn configure(wanted: bool) -> (bool, Option<&'static KtlsError>) {
    let probe = available().err();
    (wanted && probe.is_none(), probe)
}

/// Handshake message types the kernel may pass up after the hand-over (RFC 8446 §4).
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;
/// The largest TLS plaintext record: the kernel splits writes into records of at most this.
const MAX_RECORD: usize = 1 << 14;

/// Bytes read but not yet passed up, and how many of them were; holds no heap once drained.
#[derive(Debug, Default)]
struct Held {
    bytes: Vec<u8>,
    at: usize,
}

impl Held {
    fn new(bytes: Vec<u8>) -> Self {
        Self { bytes, at: 0 }
    }

    fn is_empty(&self) -> bool {
        self.at == self.bytes.len()
    }

    /// Moves as much as fits into `buf`; false when nothing was held.
    fn give(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.is_empty() {
            return false;
        }
        let n = (self.bytes.len() - self.at).min(buf.remaining());
        buf.put_slice(&self.bytes[self.at..self.at + n]);
        self.at += n;
        if self.is_empty() {
            *self = Self::default();
        }
        true
    }
}

/// The transport under rustls. While engaged (a handshake that may go to the kernel) it gives
/// rustls whole TLS records only and pauses after each one (it wakes itself and answers
/// `Pending` once), so tokio-rustls's handshake loop checks for the end of the handshake
/// between records and never reads past it.
///
/// Released, it reads ahead: rustls asks for at most one record (16 KiB) per read, so a bulk
/// transfer cost a `recv` per record. One `recv` now takes up to [`SCRATCH`] bytes into the
/// worker's scratch buffer; what rustls did not ask for is kept, on the heap only until it is
/// read, so an idle connection holds nothing.
#[derive(Debug)]
pub struct Corked<S> {
    io: S,
    engaged: bool,
    /// Read ahead and not yet given to rustls.
    ahead: Held,
    /// The current record's header, as far as it has come.
    header: [u8; 5],
    have: usize,
    /// Bytes of the current record's body still to come.
    body_left: usize,
    /// A record just ended: pause before the next.
    paused: bool,
}

impl<S> Corked<S> {
    /// Wraps `io`; `engaged` when the connection may be handed to the kernel.
    pub fn new(io: S, engaged: bool) -> Self {
        Self {
            io,
            engaged,
            ahead: Held::default(),
            header: [0; 5],
            have: 0,
            body_left: 0,
            paused: false,
        }
    }

    /// Whether the handshake went record by record.
    pub fn engaged(&self) -> bool {
        self.engaged
    }

    /// From now on, bytes pass straight through.
    pub fn release(&mut self) {
        self.engaged = false;
    }

    /// The transport itself. Only for the kernel hand-over, which takes it right after an
    /// engaged handshake: nothing was read ahead, so no byte stays behind here.
    pub fn into_inner(self) -> S {
        debug_assert!(self.ahead.is_empty(), "read-ahead bytes would be lost");
        self.io
    }

    /// Notes `got` more bytes of the stream; returns whether a record ended with them.
    fn advance(&mut self, got: &[u8]) -> bool {
        if self.have < self.header.len() {
            self.header[self.have..self.have + got.len()].copy_from_slice(got);
            self.have += got.len();
            if self.have < self.header.len() {
                return false;
            }
            self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
        } else {
            self.body_left -= got.len();
        }
        if self.body_left > 0 {
            return false;
        }
        self.have = 0;
        true
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Corked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.engaged {
            return this.read_ahead(cx, buf);
        }
        if this.paused {
            this.paused = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let want = if this.have < this.header.len() {
            this.header.len() - this.have
        } else {
            this.body_left
        };
        let dst = buf.initialize_unfilled_to(want.min(buf.remaining()));
        let mut part = ReadBuf::new(&mut *dst);
        ready!(Pin::new(&mut this.io).poll_read(cx, &mut part))?;
        let got = part.filled().len();
        this.paused = got > 0 && this.advance(&dst[..got]);
        buf.advance(got);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> Corked<S> {
    /// A released read: from what was read ahead, else one read of up to [`SCRATCH`] bytes.
    fn read_ahead(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.ahead.give(buf) {
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() >= SCRATCH {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        with_scratch(|space| {
            let mut rb = ReadBuf::new(space);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
            let got = rb.filled();
            let n = buf.remaining().min(got.len());
            buf.put_slice(&got[..n]);
            if n < got.len() {
                self.ahead = Held::new(got[n..].to_vec());
            }
            Poll::Ready(Ok(()))
        })
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Corked<S> {
    crate::protocol::write_through!(io);

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// An HBONE connection after its handshake.
pub type HboneTls = tokio_rustls::TlsStream<Corked<TcpStream>>;

/// An HBONE connection's byte stream: rustls in userspace (left), or the kernel's TLS (right).
pub type Transport = tokio_util::either::Either<Box<HboneTls>, KernelStream>;

/// HBONE connections (either end) whose records the kernel took, and those that stayed on
/// rustls: the evidence, in `/stats`, of which path carried them. Process-wide, like the
/// kernel's own TLS counters.
static ON_KERNEL: AtomicU64 = AtomicU64::new(0);
static ON_RUSTLS: AtomicU64 = AtomicU64::new(0);

/// How many HBONE connections went to the kernel's TLS and how many stayed on rustls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KtlsCounts {
    /// Handed over to the kernel (`TLS_TX` and `TLS_RX` installed).
    pub kernel: u64,
    /// Kept on rustls (kTLS off, a cipher the kernel lacks, or the ULP refused).
    pub rustls: u64,
}

/// The counts so far.
pub fn counts() -> KtlsCounts {
    KtlsCounts {
        kernel: ON_KERNEL.load(Ordering::Relaxed),
        rustls: ON_RUSTLS.load(Ordering::Relaxed),
    }
}

/// Moves a finished handshake into the kernel when it was corked (kTLS in use), the cipher
/// has a kernel counterpart and the kernel takes the `tls` ULP; otherwise it stays on rustls,
/// the cork released. An error means the secrets had left rustls and the connection is lost.
pub fn hand_over(mut tls: HboneTls) -> Result<Transport, KtlsError> {
    let (io, state) = tls.get_mut();
    if !io.engaged() {
        return Ok(on_rustls(tls));
    }
    io.release();
    if let Err(e) =
        kernel_cipher(state.negotiated_cipher_suite()).and_then(|()| attach_ulp(io.io.as_fd()))
    {
        tracing::debug!("{e}");
        return Ok(on_rustls(tls));
    }
    let over = take_over(tls)?;
    keys::enable(over.tcp.as_fd(), &over.secrets)?;
    ON_KERNEL.fetch_add(1, Ordering::Relaxed);
    Ok(Transport::Right(KernelStream {
        io: over.tcp,
        pending: Held::new(over.pending),
        sent_records: 0,
        limit: over.limit,
        notified: false,
        closed: false,
    }))
}

/// rustls queues at most this much unsent TLS. Above the 64 KiB default, so a 64 KiB HTTP/2
/// frame (HBONE's largest) is encrypted whole and leaves in one `writev` of four records.
const TLS_BUFFER: usize = 256 * 1024;

/// A connection that stays on rustls.
fn on_rustls(mut tls: HboneTls) -> Transport {
    ON_RUSTLS.fetch_add(1, Ordering::Relaxed);
    match &mut tls {
        tokio_rustls::TlsStream::Client(c) => c.get_mut().1.set_buffer_limit(Some(TLS_BUFFER)),
        tokio_rustls::TlsStream::Server(s) => s.get_mut().1.set_buffer_limit(Some(TLS_BUFFER)),
    }
    Transport::Left(Box::new(tls))
}

/// Whether the kernel has the negotiated cipher (linux/tls.h: AES-GCM and ChaCha20-Poly1305).
fn kernel_cipher(suite: Option<rustls::SupportedCipherSuite>) -> Result<(), KtlsError> {
    use rustls::CipherSuite as C;
    match suite.map(|s| s.suite()) {
        Some(
            C::TLS13_AES_128_GCM_SHA256
            | C::TLS13_AES_256_GCM_SHA384
            | C::TLS13_CHACHA20_POLY1305_SHA256,
        ) => Ok(()),
        other => Err(KtlsError::Cipher(format!("{other:?}"))),
    }
}

/// What a corked handshake leaves for the kernel.
pub struct Handover {
    /// The socket, with nothing of the connection read past the handshake.
    pub tcp: TcpStream,
    /// Plaintext rustls decrypted before the hand-over: the reader's first bytes.
    pub pending: Vec<u8>,
    /// Both directions' keys and next record sequence numbers.
    pub secrets: rustls::ExtractedSecrets,
    /// Records one key may seal (the cipher's confidentiality limit).
    pub limit: u64,
}

/// Takes a corked handshake's connection out of rustls: its plaintext, then its secrets.
pub fn take_over(tls: HboneTls) -> Result<Handover, KtlsError> {
    let (io, mut conn): (_, rustls::Connection) = match tls {
        tokio_rustls::TlsStream::Client(s) => {
            let (io, c) = s.into_inner();
            (io, c.into())
        }
        tokio_rustls::TlsStream::Server(s) => {
            let (io, c) = s.into_inner();
            (io, c.into())
        }
    };
    let limit = conn
        .negotiated_cipher_suite()
        .and_then(|s| s.tls13())
        .map_or(0, |s| s.common.confidentiality_limit);
    let mut pending = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match io::Read::read(&mut conn.reader(), &mut chunk) {
            Ok(0) => break,
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(source) => {
                return Err(KtlsError::Socket {
                    what: "take rustls's plaintext",
                    source,
                });
            }
        }
    }
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(KtlsError::Extract)?;
    Ok(Handover {
        tcp: io.into_inner(),
        pending,
        secrets,
        limit,
    })
}

impl std::fmt::Debug for Handover {
    /// Leaves the keys out: they must never reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handover")
            .field("tcp", &self.tcp)
            .field("pending", &self.pending.len())
            .field("tx_seq", &self.secrets.tx.0)
            .field("rx_seq", &self.secrets.rx.0)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

/// A TCP socket whose TLS records the kernel seals and opens.
#[derive(Debug)]
pub struct KernelStream {
    io: TcpStream,
    /// Plaintext rustls had decrypted before the hand-over.
    pending: Held,
    /// Records sealed with the current key, against `limit`.
    sent_records: u64,
    limit: u64,
    /// Our close_notify is sent.
    notified: bool,
    /// The peer's close_notify came.
    closed: bool,
}

impl AsyncRead for KernelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending.give(buf) {
            return Poll::Ready(Ok(()));
        }
        if this.closed || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(this.io.poll_read_ready(cx))?;
            let dst = buf.initialize_unfilled();
            let (n, kind) = match this.io.try_io(Interest::READABLE, || {
                sys::recv_record(this.io.as_fd(), dst)
            }) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            };
            match (kind, &dst[..n]) {
                (APPLICATION_DATA, _) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // close_notify: the end of the stream.
                (ALERT, [_, 0]) => {
                    this.closed = true;
                    return Poll::Ready(Ok(()));
                }
                (ALERT, [_, what]) => {
                    return Poll::Ready(Err(io::Error::other(format!(
                        "kTLS: the peer sent TLS alert {what}"
                    ))));
                }
                // Session tickets: we never resume, so they are dropped.
                (HANDSHAKE, [NEW_SESSION_TICKET, ..]) => {}
                (HANDSHAKE, [KEY_UPDATE, ..]) => {
                    return Poll::Ready(Err(io::Error::other(
                        "kTLS: the peer updated its keys, which the kernel path cannot follow; the connection ends and the pool opens another",
                    )));
                }
                (kind, bytes) => {
                    return Poll::Ready(Err(io::Error::other(format!(
                        "kTLS: unexpected record of type {kind} ({} bytes)",
                        bytes.len()
                    ))));
                }
            }
        }
    }
}

impl KernelStream {
    /// Counts the records a write of `n` bytes seals; refuses once the key is used up.
    fn count(&mut self, n: usize) {
        self.sent_records = self
            .sent_records
            .saturating_add(n.div_ceil(MAX_RECORD) as u64);
    }

    fn check_limit(&self) -> io::Result<()> {
        if self.sent_records >= self.limit {
            return Err(io::Error::other(
                "kTLS: this key has sealed as many records as its cipher allows; the connection ends and the pool opens another",
            ));
        }
        Ok(())
    }
}

impl AsyncWrite for KernelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_limit()?;
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        this.count(n);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_limit()?;
        let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        this.count(n);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    /// Sends close_notify, as rustls would, then the FIN.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while !this.notified {
            ready!(this.io.poll_write_ready(cx))?;
            match this.io.try_io(Interest::WRITABLE, || {
                sys::send_record(this.io.as_fd(), ALERT, &[1, 0])
            }) {
                Ok(_) => this.notified = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a test should stop at the first unexpected error"
)]
mod tests {
    use std::{io::Write, sync::Arc};

    use rustls::ConnectionTrafficSecrets;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::{
        Corked, KtlsError, Transport, available, hand_over, kernel::probe, keys::crypto_info,
        take_over,
    };
    use crate::identity::certs::tests::{Fixture, fixture};

    /// The HBONE configs of a fixture, as they are when kTLS is in use.
    fn ktls_configs(f: &Fixture) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let mut server = (*f.server.server_config()).clone();
        server.enable_secret_extraction = true;
        server.send_tls13_tickets = 0;
        let mut client = (*f.client.client_config(&f.server_id).unwrap()).clone();
        client.enable_secret_extraction = true;
        (Arc::new(server), Arc::new(client))
    }

    /// Opens (`open`) or seals one TLS 1.3 record with `secrets` at `seq`, as the kernel would:
    /// nonce = IV xor the big-endian sequence number, the record header as associated data.
    fn aead(
        secrets: &ConnectionTrafficSecrets,
    ) -> (&'static ring::aead::Algorithm, &[u8], [u8; 12]) {
        let (alg, key, iv): (_, &[u8], &[u8]) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                (&ring::aead::AES_128_GCM, key.as_ref(), iv.as_ref())
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                (&ring::aead::AES_256_GCM, key.as_ref(), iv.as_ref())
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&ring::aead::CHACHA20_POLY1305, key.as_ref(), iv.as_ref())
            }
            _ => panic!("a cipher the kernel lacks"),
        };
        (alg, key, iv.try_into().unwrap())
    }

    fn nonce(iv: [u8; 12], seq: u64) -> ring::aead::Nonce {
        let mut n = iv;
        for (b, s) in n[4..].iter_mut().zip(seq.to_be_bytes()) {
            *b ^= s;
        }
        ring::aead::Nonce::assume_unique_for_key(n)
    }

    fn open_record(secrets: &ConnectionTrafficSecrets, seq: u64, record: &[u8]) -> Vec<u8> {
        let (alg, key, iv) = aead(secrets);
        let key = ring::aead::LessSafeKey::new(ring::aead::UnboundKey::new(alg, key).unwrap());
        let (header, body) = record.split_at(5);
        let mut body = body.to_vec();
        let plain = key
            .open_in_place(nonce(iv, seq), ring::aead::Aad::from(header), &mut body)
            .unwrap();
        // TLSInnerPlaintext: content, the real type, then zero padding.
        let end = plain.iter().rposition(|&b| b != 0).unwrap();
        assert_eq!(plain[end], 23, "not an application data record");
        plain[..end].to_vec()
    }

    fn seal_record(secrets: &ConnectionTrafficSecrets, seq: u64, data: &[u8]) -> Vec<u8> {
        let (alg, key, iv) = aead(secrets);
        let key = ring::aead::LessSafeKey::new(ring::aead::UnboundKey::new(alg, key).unwrap());
        let mut body = data.to_vec();
        body.push(23);
        let len = u16::try_from(body.len() + alg.tag_len()).unwrap();
        let mut header = vec![23, 3, 3];
        header.extend_from_slice(&len.to_be_bytes());
        key.seal_in_place_append_tag(nonce(iv, seq), ring::aead::Aad::from(&header), &mut body)
            .unwrap();
        [header, body].concat()
    }

    /// The state a corked handshake hands over is exactly the kernel's starting point. The
    /// client sends its Finished and its first data in one segment (as an HTTP/2 client
    /// sending its preface does); the server's handshake stops at the Finished, so the data
    /// record is still in the socket, and opens with the extracted receive key at the extracted
    /// sequence number. A record sealed with the extracted send key at its sequence number
    /// (after the server's own handshake records) reads as plaintext in the client's rustls.
    /// This kernel has no TLS: the test plays its part with an independent AEAD.
    #[tokio::test]
    async fn a_corked_handshake_hands_over_exactly_the_next_record() {
        let f = fixture("ktls-handover");
        let (server_cfg, client_cfg) = ktls_configs(&f);
        // Tickets on here: they are the server's first records under the traffic key, so the
        // send sequence number handed over must count them.
        let mut server_cfg = (*server_cfg).clone();
        server_cfg.send_tls13_tickets = 2;
        let server_cfg = Arc::new(server_cfg);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::thread::spawn(move || {
            let mut tcp = std::net::TcpStream::connect(addr).unwrap();
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let mut conn = rustls::ClientConnection::new(client_cfg, name).unwrap();
            // Only the ClientHello and the server's flight: the Finished waits for the data.
            while conn.is_handshaking() {
                if conn.wants_write() {
                    conn.write_tls(&mut tcp).unwrap();
                    continue;
                }
                conn.read_tls(&mut tcp).unwrap();
                conn.process_new_packets().unwrap();
            }
            conn.writer().write_all(b"client speaks first").unwrap();
            let mut all = Vec::new();
            while conn.wants_write() {
                conn.write_tls(&mut all).unwrap();
            }
            tcp.write_all(&all).unwrap();
            // Whatever the server seals for us next.
            let mut got = vec![0; 64];
            let n = loop {
                conn.read_tls(&mut tcp).unwrap();
                conn.process_new_packets().unwrap();
                match std::io::Read::read(&mut conn.reader(), &mut got) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            };
            got.truncate(n);
            got
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = tokio_rustls::TlsAcceptor::from(server_cfg)
            .accept(Corked::new(tcp, true))
            .await
            .unwrap();
        let over = take_over(tls.into()).unwrap();
        assert!(over.pending.is_empty(), "rustls read past the handshake");
        assert!(over.limit > 0);
        // The data record, read raw: header, then its body.
        let mut header = [0u8; 5];
        let mut tcp = over.tcp;
        tcp.read_exact(&mut header).await.unwrap();
        assert_eq!(header[0], 23, "the next record is not application data");
        let mut body = vec![0; usize::from(u16::from_be_bytes([header[3], header[4]]))];
        tcp.read_exact(&mut body).await.unwrap();
        let (rx_seq, rx) = &over.secrets.rx;
        let plain = open_record(rx, *rx_seq, &[&header[..], &body].concat());
        assert_eq!(plain, b"client speaks first");
        let (tx_seq, tx) = &over.secrets.tx;
        // rustls sends both tickets in one record.
        assert_eq!(*tx_seq, 1, "the tickets went out under the traffic key");
        tcp.write_all(&seal_record(tx, *tx_seq, b"sealed as the kernel would"))
            .await
            .unwrap();
        assert_eq!(client.join().unwrap(), b"sealed as the kernel would");
        let _ = std::fs::remove_dir_all(&f.dir);
    }

    /// Counts the reads that returned bytes.
    struct CountingReads<R> {
        io: R,
        reads: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for CountingReads<R> {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let this = self.get_mut();
            let before = buf.filled().len();
            let r = std::pin::Pin::new(&mut this.io).poll_read(cx, buf);
            if buf.filled().len() > before {
                this.reads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            r
        }
    }

    /// A released transport reads ahead: 1 MiB of TLS already waiting is taken in reads of
    /// 64 KiB, not one per 16 KiB record as rustls asks, every byte arrives once and in order,
    /// and once it is read nothing is kept.
    #[tokio::test]
    async fn a_released_transport_reads_several_records_at_once_and_keeps_nothing_after() {
        let f = fixture("read-ahead");
        let (server_cfg, client_cfg) = ktls_configs(&f);
        // Room for all of it, so the data waits whole before the server reads.
        let (client_io, server_io) = tokio::io::duplex(4 << 20);
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
        let sent = data.clone();
        let client = tokio::spawn(async move {
            let name = rustls::pki_types::ServerName::IpAddress(
                std::net::IpAddr::from([127, 0, 0, 1]).into(),
            );
            let mut tls = tokio_rustls::TlsConnector::from(client_cfg)
                .connect(name, client_io)
                .await
                .unwrap();
            tls.write_all(&sent).await.unwrap();
            tls.shutdown().await.unwrap();
        });
        let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (r, w) = tokio::io::split(server_io);
        let counted = CountingReads {
            io: r,
            reads: reads.clone(),
        };
        let mut tls = tokio_rustls::TlsAcceptor::from(server_cfg)
            .accept(Corked::new(tokio::io::join(counted, w), false))
            .await
            .unwrap();
        client.await.unwrap();
        let handshake_reads = reads.load(std::sync::atomic::Ordering::Relaxed);
        let mut got = Vec::new();
        tls.read_to_end(&mut got).await.unwrap();
        assert!(got == data, "the bytes differ");
        let data_reads = reads.load(std::sync::atomic::Ordering::Relaxed) - handshake_reads;
        let records = data.len() / super::MAX_RECORD;
        assert!(
            data_reads * 3 <= records,
            "{data_reads} reads for {records} records: no read-ahead"
        );
        assert!(tls.get_ref().0.ahead.is_empty(), "kept bytes after the end");
        let _ = std::fs::remove_dir_all(&f.dir);
    }

    /// A client that handshakes through the cork and hands over, as the HBONE pool does.
    async fn corked_client(
        addr: std::net::SocketAddr,
        cfg: Arc<rustls::ClientConfig>,
    ) -> Transport {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, Corked::new(tcp, true))
            .await
            .unwrap();
        hand_over(tls.into()).unwrap()
    }

    /// Both ends hand over after a corked handshake. Without kernel TLS (this machine) both
    /// stay on rustls, the cork released, and no byte is lost or repeated: the client's first
    /// data, sent with its Finished, arrives once. Where the kernel has TLS, both move to it
    /// and the same bytes cross the kernel's records, close_notify included.
    #[tokio::test]
    async fn hand_over_uses_the_kernel_where_it_has_tls_and_otherwise_stays_on_rustls() {
        let f = fixture("ktls-skip");
        let (server_cfg, client_cfg) = ktls_configs(&f);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut io = corked_client(addr, client_cfg).await;
            io.write_all(b"ping").await.unwrap();
            io.flush().await.unwrap();
            let mut pong = [0u8; 4];
            io.read_exact(&mut pong).await.unwrap();
            io.shutdown().await.unwrap();
            (matches!(io, Transport::Right(_)), pong)
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = tokio_rustls::TlsAcceptor::from(server_cfg)
            .accept(Corked::new(tcp, true))
            .await
            .unwrap();
        let mut io = hand_over(tls.into()).unwrap();
        let kernel = matches!(io, Transport::Right(_));
        if let Transport::Left(s) = &io {
            assert!(!s.get_ref().0.engaged(), "the cork stayed on");
        }
        let mut ping = [0u8; 4];
        io.read_exact(&mut ping).await.unwrap();
        assert_eq!(&ping, b"ping");
        io.write_all(b"pong").await.unwrap();
        io.flush().await.unwrap();
        let mut rest = Vec::new();
        io.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "bytes after ping: {rest:?}");
        let (client_kernel, pong) = client.await.unwrap();
        assert_eq!(&pong, b"pong");
        assert_eq!(kernel, available().is_ok(), "server side");
        assert_eq!(client_kernel, available().is_ok(), "client side");
        let _ = std::fs::remove_dir_all(&f.dir);
    }

    /// What ARCHITECTURE.md promises of the kernel path, on a kernel with TLS (the qemu guest;
    /// on a kernel without it the client stays on rustls, which follows the key update, and the
    /// test checks that instead): a peer's KeyUpdate ends the connection with an error that says
    /// so, never with bytes decrypted under a stale key; and once a key has sealed as many
    /// records as its cipher allows, writes are refused rather than sealed past the limit.
    #[tokio::test]
    async fn a_key_update_ends_a_kernel_connection_and_the_record_limit_refuses_writes() {
        let f = fixture("ktls-keyupdate");
        let (server_cfg, client_cfg) = ktls_configs(&f);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            // The peer stays on rustls, which can send a KeyUpdate.
            let mut tls = tokio_rustls::TlsAcceptor::from(server_cfg)
                .accept(Corked::new(tcp, false))
                .await
                .unwrap();
            let mut first = [0u8; 5];
            tls.read_exact(&mut first).await.unwrap();
            assert_eq!(&first, b"hello");
            tls.get_mut().1.refresh_traffic_keys().unwrap();
            tls.write_all(b"after").await.unwrap();
            tls.flush().await.unwrap();
            let mut rest = Vec::new();
            let _ = tls.read_to_end(&mut rest).await;
        });
        let mut io = corked_client(addr, client_cfg).await;
        assert_eq!(matches!(io, Transport::Right(_)), available().is_ok());
        // The qemu guest's kernel has TLS: there the kernel path must be what was tested.
        if std::env::var("MESH_TEST_EXPECT_KTLS").as_deref() == Ok("1") {
            assert!(
                matches!(io, Transport::Right(_)),
                "the kernel's TLS was expected"
            );
        }
        io.write_all(b"hello").await.unwrap();
        io.flush().await.unwrap();
        let mut after = [0u8; 5];
        let read = io.read_exact(&mut after).await;
        match &mut io {
            Transport::Right(kernel) => {
                let e = read.expect_err("a key update must end the kernel path");
                assert!(e.to_string().contains("updated its keys"), "{e}");
                // The record limit, brought near: one more record, then refusal.
                kernel.limit = kernel.sent_records + 1;
                let mut k = std::pin::Pin::new(kernel);
                k.write_all(b"x").await.unwrap();
                let e = k.write_all(b"y").await.expect_err("past the record limit");
                assert!(
                    e.to_string()
                        .contains("as many records as its cipher allows"),
                    "{e}"
                );
            }
            Transport::Left(_) => {
                read.unwrap();
                assert_eq!(&after, b"after", "rustls follows the key update");
            }
        }
        drop(io);
        server.await.unwrap();
        let _ = std::fs::remove_dir_all(&f.dir);
    }

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
