//! A TLS stream on rustls's unbuffered API: veer owns every buffer.
//!
//! rustls's buffered connection keeps a 4 KiB read buffer for the life of
//! the connection and fills it 4 KiB per `read(2)`. Here the ciphertext
//! buffers are ours:
//! - `rx` (ciphertext read, not yet processed) is allocated when the socket
//!   is readable, filled with reads of up to [`RX_SIZE`] (four full
//!   records), and freed as soon as it is empty and the socket would block;
//! - `tx` (ciphertext to send) is freed once sent and the stream flushed;
//! - `plain` holds only the rest of a record that did not fit the reader's
//!   buffer.
//!
//! An idle connection therefore holds none of them, only rustls's own
//! state (keys, peer chain).
//!
//! Records are processed one at a time and only while the reader has room,
//! so a slow reader leaves ciphertext in the socket, not plaintext here.
//! The stream is meant for one task that polls both directions (the relay):
//! a write that has to set aside decrypted bytes wakes that task so that its
//! reading half sees them.
use crate::relay::Leg;
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, UnbufferedConnectionCommon, UnbufferedStatus,
};
use std::future::Future;
use std::io;
use std::ops::DerefMut;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Ciphertext read per `read(2)`: four full TLS records (16 KiB of
/// plaintext, 5 bytes of header and up to 256 of overhead each), as many
/// as fill the relay's copy buffer.
pub const RX_SIZE: usize = 4 * (16 * 1024 + 5 + 256);
/// The most ciphertext held while a handshake message is incomplete
/// (rustls itself refuses handshake messages over 64 KiB).
const RX_MAX: usize = RX_SIZE + 64 * 1024;
/// Plaintext encrypted per write call.
const MAX_WRITE: usize = 64 * 1024;

/// A rustls unbuffered connection, client or server.
pub trait Side: DerefMut<Target = UnbufferedConnectionCommon<Self::Data>> + Send + Unpin {
    type Data;
    fn process<'c, 'i>(&'c mut self, rx: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl Side for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(&'c mut self, rx: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(rx)
    }
}

impl Side for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(&'c mut self, rx: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(rx)
    }
}

pub type ServerTls<IO> = TlsStream<IO, UnbufferedServerConnection>;
pub type ClientTls<IO> = TlsStream<IO, UnbufferedClientConnection>;

/// A TLS connection over a TCP leg. Create it with [`TlsStream::new`], run
/// [`TlsStream::handshake`], then read and write.
pub struct TlsStream<IO, C> {
    io: IO,
    conn: C,
    rx: Vec<u8>,
    tx: Vec<u8>,
    tx_pos: usize,
    plain: Vec<u8>,
    plain_pos: usize,
    /// The peer sent close_notify: reads return EOF.
    peer_closed: bool,
    /// TCP EOF (or an error) from the socket.
    tcp_eof: bool,
    /// Some ciphertext arrived (a peer that closes before that is a probe).
    received: bool,
    /// Our close_notify is queued; no more writes.
    close_queued: bool,
    /// The first error rustls reported; the connection is dead after it
    /// (processing the same bytes again would send a second alert).
    failed: Option<rustls::Error>,
}

/// What to do with decrypted application data while processing.
enum Plain<'a, 'b> {
    /// Copy into the reader's buffer; stop when it is full.
    Into(&'a mut ReadBuf<'b>),
    /// Leave it inside rustls for a later read (during the handshake).
    Leave,
    /// Set it aside in `plain` (a write must get past it).
    SetAside,
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Appends to `tx` what `put` writes into a slice, starting with `guess`
/// bytes of room and growing to the size rustls asks for. `put` returns the
/// bytes written, `Err(Some(n))` for "needs `n`", or `Err(None)` to give
/// up; `false` when it gave up (nothing appended).
fn append(
    tx: &mut Vec<u8>,
    guess: usize,
    mut put: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
) -> bool {
    let at = tx.len();
    tx.resize(at + guess, 0);
    loop {
        match put(&mut tx[at..]) {
            Ok(n) => {
                tx.truncate(at + n);
                return true;
            }
            Err(Some(need)) => tx.resize(at + need, 0),
            Err(None) => {
                tx.truncate(at);
                return false;
            }
        }
    }
}

fn encode_room(e: EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(s) => Some(s.required_size),
        EncodeError::AlreadyEncoded => None,
    }
}

fn encrypt_room(e: EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(s) => Some(s.required_size),
        EncryptError::EncryptExhausted => None,
    }
}

impl<IO: Leg, C: Side> TlsStream<IO, C> {
    pub fn new(io: IO, conn: C) -> Self {
        TlsStream {
            io,
            conn,
            rx: Vec::new(),
            tx: Vec::new(),
            tx_pos: 0,
            plain: Vec::new(),
            plain_pos: 0,
            peer_closed: false,
            tcp_eof: false,
            received: false,
            close_queued: false,
            failed: None,
        }
    }

    /// The rustls connection (peer certificates, handshake kind, ...).
    pub fn conn(&self) -> &C {
        &self.conn
    }

    /// Whether any byte came from the peer: a connection that closes or
    /// resets before that is a TCP probe, not a failed handshake.
    pub fn received_any(&self) -> bool {
        self.received
    }

    /// Runs the handshake to its end. A rustls error comes back as an
    /// `InvalidData` I/O error wrapping it, after the alert (if any) was
    /// offered to the socket.
    pub async fn handshake(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_handshake(cx)).await
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if let Err(e) = self.process(Plain::Leave, None, false) {
                self.send_alert();
                return Poll::Ready(Err(tls_err(e)));
            }
            ready!(self.poll_send(cx))?;
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.poll_fill(cx))? {
                0 => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed during the TLS handshake",
                    )))
                }
                _ => continue,
            }
        }
    }

    /// After a rustls error: encode the alert rustls queued and offer it to
    /// the socket without waiting. One call only, on an empty input: the
    /// queued alert comes out before rustls looks at any input again.
    fn send_alert(&mut self) {
        let UnbufferedStatus { state, .. } = self.conn.process(&mut []);
        if let Ok(ConnectionState::EncodeTlsData(mut e)) = state {
            let mut alert = Vec::new();
            if append(&mut alert, 64, |b| e.encode(b).map_err(encode_room)) {
                let _ = self.io.tcp().try_write(&alert);
            }
        }
    }

    /// Processes the records in `rx`: handshake messages, alerts, key
    /// updates and application data (to `plain_to`); encodes what rustls
    /// wants to send into `tx`; encrypts `write` and the close_notify when
    /// `close`, once the connection can send. Stops when every complete
    /// record is processed, the reader is full, or both sides closed;
    /// returns how many bytes of `write` it took.
    fn process(
        &mut self,
        mut plain_to: Plain<'_, '_>,
        write: Option<&[u8]>,
        close: bool,
    ) -> Result<usize, rustls::Error> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let mut written = 0;
        let mut write = write;
        let Self {
            conn,
            rx,
            tx,
            plain,
            peer_closed,
            close_queued,
            failed,
            ..
        } = self;
        let result = loop {
            let UnbufferedStatus { mut discard, state } = conn.process(&mut rx[..]);
            let mut stop = false;
            let mut error = None;
            match state {
                Err(e) => error = Some(e),
                Ok(ConnectionState::ReadTraffic(mut r)) => {
                    let room = match &plain_to {
                        Plain::Into(buf) => buf.remaining() > 0,
                        Plain::Leave => false,
                        Plain::SetAside => true,
                    };
                    if !room {
                        stop = true;
                    } else {
                        // One record per ReadTraffic state.
                        while let Some(rec) = r.next_record() {
                            match rec {
                                Err(e) => {
                                    error = Some(e);
                                    break;
                                }
                                Ok(rec) => {
                                    discard += rec.discard;
                                    let mut rest = rec.payload;
                                    if let Plain::Into(buf) = &mut plain_to {
                                        let n = rest.len().min(buf.remaining());
                                        buf.put_slice(&rest[..n]);
                                        rest = &rest[n..];
                                    }
                                    if !rest.is_empty() {
                                        plain.extend_from_slice(rest);
                                    }
                                }
                            }
                            if matches!(&plain_to, Plain::Into(buf) if buf.remaining() == 0) {
                                stop = true;
                                break;
                            }
                        }
                    }
                }
                // Never offered: the server configs keep max_early_data_size
                // at 0.
                Ok(ConnectionState::ReadEarlyData(_)) => {
                    error = Some(rustls::Error::General("unexpected early data".into()))
                }
                Ok(ConnectionState::PeerClosed) => *peer_closed = true,
                Ok(ConnectionState::Closed) => {
                    *peer_closed = true;
                    stop = true;
                }
                Ok(ConnectionState::EncodeTlsData(mut e)) => {
                    append(tx, 0, |b| e.encode(b).map_err(encode_room));
                }
                // What was encoded sits in `tx`, which is sent in order
                // before anything queued later.
                Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
                Ok(ConnectionState::BlockedHandshake) => stop = true,
                Ok(ConnectionState::WriteTraffic(mut w)) => {
                    if let Some(data) = write.take() {
                        // Room for the records' headers and tags.
                        let guess = data.len() + 64 * (data.len() / 16384 + 1);
                        if append(tx, guess, |b| w.encrypt(data, b).map_err(encrypt_room)) {
                            written = data.len();
                        } else {
                            error = Some(rustls::Error::EncryptError);
                        }
                    }
                    if close && !*close_queued && error.is_none() {
                        append(tx, 64, |b| w.queue_close_notify(b).map_err(encrypt_room));
                        *close_queued = true;
                    }
                    stop = true;
                }
                Ok(_) => stop = true,
            }
            if discard > 0 {
                rx.drain(..discard);
            }
            if let Some(e) = error {
                rx.clear();
                *failed = Some(e.clone());
                break Err(e);
            }
            if stop {
                break Ok(written);
            }
        };
        result
    }

    /// Reads more ciphertext into `rx`. `Ready(Ok(0))` is TCP EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        // Wait for data before taking a buffer: a quiet connection holds
        // none, and polling it allocates nothing.
        if self.io.tcp().poll_read_ready(cx)?.is_pending() {
            if self.rx.is_empty() {
                self.rx = Vec::new();
            }
            return Poll::Pending;
        }
        if self.rx.capacity() == 0 {
            self.rx = Vec::with_capacity(RX_SIZE);
        } else if self.rx.len() == self.rx.capacity() {
            if self.rx.len() >= RX_MAX {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS message too large",
                )));
            }
            self.rx.reserve(RX_SIZE.min(RX_MAX - self.rx.len()));
        }
        // tokio's read: a short read clears the readiness, so the next
        // call waits instead of trying a read that would block.
        match std::pin::pin!(self.io.read_buf(&mut self.rx)).poll(cx) {
            Poll::Ready(Ok(0)) => {
                self.tcp_eof = true;
                Poll::Ready(Ok(0))
            }
            Poll::Ready(Ok(n)) => {
                self.received = true;
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => {
                self.tcp_eof = true;
                Poll::Ready(Err(e))
            }
            Poll::Pending => {
                if self.rx.is_empty() {
                    // Nothing held while the connection is quiet.
                    self.rx = Vec::new();
                }
                Poll::Pending
            }
        }
    }

    /// Sends what is in `tx`; `Ready(Ok)` once all of it is sent.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.tx_pos < self.tx.len() {
            match self.io.tcp().try_write(&self.tx[self.tx_pos..]) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.tx_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.io.tcp().poll_write_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.tx.clear();
        self.tx_pos = 0;
        Poll::Ready(Ok(()))
    }

    /// Hands out set-aside plaintext; true if any was copied.
    fn take_plain(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.plain_pos >= self.plain.len() {
            return false;
        }
        let n = (self.plain.len() - self.plain_pos).min(buf.remaining());
        buf.put_slice(&self.plain[self.plain_pos..self.plain_pos + n]);
        self.plain_pos += n;
        if self.plain_pos == self.plain.len() {
            self.plain = Vec::new();
            self.plain_pos = 0;
        }
        true
    }
}

impl<IO: Leg, C: Side> AsyncRead for TlsStream<IO, C> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.take_plain(buf) {
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            match this.process(Plain::Into(buf), None, false) {
                Ok(_) => {}
                // What was decrypted before the bad record goes out first;
                // the error comes with the next read.
                Err(_) if buf.filled().len() > before => return Poll::Ready(Ok(())),
                Err(e) => return Poll::Ready(Err(tls_err(e))),
            }
            // Key-update answers and the like: send without waiting.
            if this.tx_pos < this.tx.len() {
                if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            if buf.filled().len() > before || this.take_plain(buf) {
                return Poll::Ready(Ok(()));
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if this.tcp_eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the connection without sending TLS close_notify",
                )));
            }
            ready!(this.poll_fill(cx))?;
        }
    }
}

impl<IO: Leg, C: Side> AsyncWrite for TlsStream<IO, C> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // One batch of ciphertext at a time: backpressure.
        ready!(this.poll_send(cx))?;
        if this.close_queued {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let data = &data[..data.len().min(MAX_WRITE)];
        let had_plain = this.plain.len() - this.plain_pos;
        let n = this
            .process(Plain::SetAside, Some(data), false)
            .map_err(tls_err)?;
        if this.plain.len() - this.plain_pos > had_plain {
            // Decrypted bytes were set aside to get to the write state:
            // the reading half must see them even if its socket is quiet.
            cx.waker().wake_by_ref();
        }
        if n == 0 && !data.is_empty() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "TLS connection cannot send",
            )));
        }
        // Send now if the socket takes it; otherwise the next call (or
        // flush) waits for it.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Encrypts the slices one after another (each into its own records)
    /// and sends them with one write: HTTP/2 ([`crate::mux`]) hands a frame
    /// header and its payload as two slices, which would otherwise cost two
    /// writes.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        if this.close_queued {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let had_plain = this.plain.len() - this.plain_pos;
        let mut n = 0;
        let mut wanted = false;
        for b in bufs.iter().filter(|b| !b.is_empty()) {
            wanted = true;
            if n >= MAX_WRITE {
                break;
            }
            let take = &b[..b.len().min(MAX_WRITE - n)];
            let w = this
                .process(Plain::SetAside, Some(take), false)
                .map_err(tls_err)?;
            n += w;
            if w < take.len() {
                break;
            }
        }
        if this.plain.len() - this.plain_pos > had_plain {
            cx.waker().wake_by_ref();
        }
        if n == 0 && wanted {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "TLS connection cannot send",
            )));
        }
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        // Flushed: an idle direction holds no buffer.
        this.tx = Vec::new();
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_queued {
            ready!(this.poll_send(cx))?;
            let had_plain = this.plain.len() - this.plain_pos;
            this.process(Plain::SetAside, None, true).map_err(tls_err)?;
            if this.plain.len() - this.plain_pos > had_plain {
                cx.waker().wake_by_ref();
            }
            this.close_queued = true;
        }
        ready!(this.poll_send(cx))?;
        this.tx = Vec::new();
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

impl<IO: Leg, C: Side> Leg for TlsStream<IO, C> {
    fn tcp(&self) -> &tokio::net::TcpStream {
        self.io.tcp()
    }
}

#[cfg(test)]
mod tests;
