//! Serves any `:authority` on the Unix socket.
//!
//! kube-apiservers before the kmsv2 authority fix (and every KMS v1 client, grpcio, k3s of
//! that era) send the socket path as `:authority`, raw (`/var/run/kms.sock`) or
//! percent-encoded (`%2Fvar%2Frun%2Fkms.sock`). `h2` refuses both before tonic sees the
//! request (RST_STREAM PROTOCOL_ERROR), because neither parses as a URI authority. On a
//! Unix socket the authority means nothing, so this layer sits on each accepted stream,
//! reads the client's frames, and replaces an authority `h2` would refuse with
//! `localhost`. Everything else reaches `h2` unchanged.
//!
//! How: the connection's first header block (a request's HEADERS) is decoded. If its
//! authority is one `h2` accepts (or absent), the block and everything after it pass byte
//! for byte with no more decoding: a gRPC client keeps one authority per connection, so
//! newer apiservers, tonic and grpcurl cost a copy. Otherwise every block from then on is
//! decoded (the client's HPACK dynamic table must be tracked) and re-encoded as literals
//! without indexing with the authority replaced, so `h2`'s dynamic table never again
//! depends on the client's. Non-header frames are copied through without being buffered
//! whole. Memory per connection is bounded by [`MAX_BLOCK`] and [`MAX_DECODED`]; anything
//! malformed ends that connection only. (A client that changed to a bad authority later
//! on a settled connection would get h2's own refusal for that stream, as without this
//! layer.)

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};

use super::hpack::{Flow, encode_integer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEAD: usize = 9;
const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// The largest header block (all its HEADERS and CONTINUATION payloads) accepted, and so
/// the largest frame payload buffered. gRPC requests carry a few hundred bytes of headers.
pub const MAX_BLOCK: usize = 64 * 1024;
/// The most decoded header bytes one block may expand to (indexed fields can repeat a
/// table entry many times over).
pub const MAX_DECODED: usize = 256 * 1024;
/// The HPACK table size `h2` advertises (the protocol default; tonic does not change it).
const TABLE_SIZE: usize = 4096;
/// Re-encoded blocks are cut into frames no larger than every peer must accept.
const OUT_FRAME: usize = 16 * 1024;
const READ_CHUNK: usize = 16 * 1024;
/// What an unusable authority becomes.
const REPLACEMENT: &[u8] = b"localhost";

/// Why a connection was closed: the client sent HTTP/2 this layer cannot pass on.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("a header block of more than {MAX_BLOCK} bytes")]
    BlockTooLarge,
    #[error("a header block that decodes to more than {MAX_DECODED} bytes")]
    DecodedTooLarge,
    #[error("a frame other than CONTINUATION inside a header block")]
    ExpectedContinuation,
    #[error("a CONTINUATION frame outside a header block")]
    StrayContinuation,
    #[error("a PUSH_PROMISE frame, which clients must not send")]
    PushPromise,
    #[error("a HEADERS frame whose padding or priority is longer than the frame")]
    BadPadding,
    #[error("a header block that is not valid HPACK: {0}")]
    Hpack(String),
}

impl From<FrameError> for io::Error {
    fn from(e: FrameError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Whether `h2` would accept `value` as `:authority` (the very check it applies).
pub fn authority_is_valid(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

#[derive(Clone, Copy)]
enum State {
    /// Checking the connection preface; the count of bytes matched so far.
    Preface(usize),
    /// Waiting for the next frame's 9-byte head.
    FrameHead,
    /// Copying the rest of a non-header frame's payload.
    Forward(usize),
    /// Waiting for a whole HEADERS or CONTINUATION payload.
    HeaderPayload { kind: u8, flags: u8, len: usize },
    /// Not HTTP/2 with prior knowledge: pass everything and let `h2` answer it.
    Passthrough,
}

/// The header block being assembled from a HEADERS frame and its CONTINUATIONs.
struct Block {
    /// The HEADERS flags that survive re-encoding (END_STREAM, PRIORITY).
    flags: u8,
    stream: u32,
    priority: [u8; 5],
    /// The HPACK fragments, concatenated.
    fragment: BytesMut,
    /// The frames exactly as received, for when the block passes unchanged.
    raw: BytesMut,
}

/// The client-to-server half of the layer, independent of any I/O: bytes in, bytes out.
pub struct Rewriter {
    state: State,
    input: BytesMut,
    output: BytesMut,
    block: Option<Block>,
    decoder: super::hpack::Decoder,
    /// Decoded fields of the current block: names and values end to end in `arena`.
    arena: Vec<u8>,
    fields: Vec<(usize, usize, usize)>,
    /// Set once a block has been re-encoded: every later block must be too.
    reencode: bool,
    /// Set once the first block passed unchanged: nothing more to look at.
    settled: bool,
    rewritten: u64,
    /// The first authority replaced (a socket path: not secret), for the log.
    first_replaced: Option<String>,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Rewriter {
    pub fn new() -> Self {
        Self {
            state: State::Preface(0),
            input: BytesMut::new(),
            output: BytesMut::new(),
            block: None,
            decoder: super::hpack::Decoder::new(TABLE_SIZE),
            arena: Vec::new(),
            fields: Vec::new(),
            reencode: false,
            settled: false,
            rewritten: 0,
            first_replaced: None,
        }
    }

    /// How many header blocks had their authority replaced so far.
    pub fn rewritten(&self) -> u64 {
        self.rewritten
    }

    /// The first authority this connection had replaced, shortened to 200 characters.
    pub fn first_replaced(&self) -> Option<&str> {
        self.first_replaced.as_deref()
    }

    /// Takes bytes read from the client and processes as much as possible.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        self.input.extend_from_slice(bytes);
        self.process()
    }

    /// The processed bytes ready for `h2`.
    pub fn output(&mut self) -> &mut BytesMut {
        &mut self.output
    }

    fn process(&mut self) -> Result<(), FrameError> {
        loop {
            match self.state {
                State::Passthrough => {
                    let all = self.input.split();
                    self.output.unsplit(all);
                    return Ok(());
                }
                State::Preface(matched) => {
                    let n = (PREFACE.len() - matched).min(self.input.len());
                    if n == 0 {
                        return Ok(());
                    }
                    if self.input[..n] != PREFACE[matched..matched + n] {
                        self.state = State::Passthrough;
                        continue;
                    }
                    self.output.extend_from_slice(&self.input.split_to(n));
                    self.state = if matched + n == PREFACE.len() {
                        State::FrameHead
                    } else {
                        State::Preface(matched + n)
                    };
                }
                State::Forward(0) => self.state = State::FrameHead,
                State::Forward(left) => {
                    let n = left.min(self.input.len());
                    if n == 0 {
                        return Ok(());
                    }
                    self.output.extend_from_slice(&self.input.split_to(n));
                    self.state = State::Forward(left - n);
                }
                State::FrameHead => {
                    if self.input.len() < FRAME_HEAD {
                        return Ok(());
                    }
                    let h = &self.input[..FRAME_HEAD];
                    let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    let (kind, flags) = (h[3], h[4]);
                    if self.block.is_some() && kind != CONTINUATION {
                        return Err(FrameError::ExpectedContinuation);
                    }
                    match kind {
                        HEADERS | CONTINUATION => {
                            if kind == CONTINUATION && self.block.is_none() {
                                return Err(FrameError::StrayContinuation);
                            }
                            if len > MAX_BLOCK {
                                return Err(FrameError::BlockTooLarge);
                            }
                            self.state = State::HeaderPayload { kind, flags, len };
                        }
                        PUSH_PROMISE => return Err(FrameError::PushPromise),
                        _ => {
                            self.output
                                .extend_from_slice(&self.input.split_to(FRAME_HEAD));
                            self.state = State::Forward(len);
                        }
                    }
                }
                State::HeaderPayload { kind, flags, len } => {
                    if self.input.len() < FRAME_HEAD + len {
                        self.input.reserve(FRAME_HEAD + len - self.input.len());
                        return Ok(());
                    }
                    let frame = self.input.split_to(FRAME_HEAD + len);
                    self.header_frame(kind, flags, frame)?;
                    self.state = if self.settled {
                        State::Passthrough
                    } else {
                        State::FrameHead
                    };
                }
            }
        }
    }

    fn header_frame(&mut self, kind: u8, flags: u8, frame: BytesMut) -> Result<(), FrameError> {
        let payload = &frame[FRAME_HEAD..];
        let block = match (&mut self.block, kind) {
            (Some(b), _) => {
                b.fragment.extend_from_slice(payload);
                b.raw.extend_from_slice(&frame);
                b
            }
            (None, _) => {
                let stream =
                    u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
                let mut body = payload;
                let mut pad = 0;
                if flags & PADDED != 0 {
                    let (&p, rest) = body.split_first().ok_or(FrameError::BadPadding)?;
                    pad = usize::from(p);
                    body = rest;
                }
                let mut priority = [0u8; 5];
                if flags & PRIORITY != 0 {
                    let p = body.get(..5).ok_or(FrameError::BadPadding)?;
                    priority.copy_from_slice(p);
                    body = &body[5..];
                }
                let body = body
                    .get(..body.len().checked_sub(pad).ok_or(FrameError::BadPadding)?)
                    .ok_or(FrameError::BadPadding)?;
                self.block.insert(Block {
                    flags: flags & (END_STREAM | PRIORITY),
                    stream,
                    priority,
                    fragment: BytesMut::from(body),
                    raw: frame.clone(),
                })
            }
        };
        // The raw frames also bound the frame heads of a block cut into tiny CONTINUATIONs.
        if block.fragment.len() > MAX_BLOCK || block.raw.len() > 2 * MAX_BLOCK {
            return Err(FrameError::BlockTooLarge);
        }
        if flags & END_HEADERS != 0 {
            self.finish_block()?;
        }
        Ok(())
    }

    /// Decodes the finished block, then passes it on unchanged or re-encoded.
    fn finish_block(&mut self) -> Result<(), FrameError> {
        let Some(block) = self.block.take() else {
            return Ok(());
        };
        self.arena.clear();
        self.fields.clear();
        let (arena, fields) = (&mut self.arena, &mut self.fields);
        let mut too_large = false;
        let mut replace = false;
        let first_replaced = &mut self.first_replaced;
        self.decoder
            .decode(&block.fragment, |name, value| {
                if arena.len() + name.len() + value.len() > MAX_DECODED {
                    too_large = true;
                    return Flow::Stop;
                }
                let is_authority = name == b":authority";
                let bad = is_authority && !authority_is_valid(value);
                replace |= bad;
                if bad && first_replaced.is_none() {
                    *first_replaced =
                        Some(String::from_utf8_lossy(value).chars().take(200).collect());
                }
                let start = arena.len();
                arena.extend_from_slice(name);
                arena.extend_from_slice(if bad { REPLACEMENT } else { value });
                fields.push((start, name.len(), arena.len()));
                Flow::Continue
            })
            .map_err(|e| FrameError::Hpack(e.to_string()))?;
        if too_large {
            return Err(FrameError::DecodedTooLarge);
        }
        if replace {
            self.rewritten += 1;
            self.reencode = true;
        }
        if !self.reencode {
            self.output.unsplit(block.raw);
            self.settled = true;
            return Ok(());
        }
        let mut hpack = Vec::with_capacity(self.arena.len() + 8 * self.fields.len());
        for &(start, name_len, end) in &self.fields {
            let (name, value) = self.arena[start..end].split_at(name_len);
            literal_without_indexing(name, value, &mut hpack);
        }
        self.emit_frames(&block, &hpack);
        Ok(())
    }

    /// Writes `hpack` as one HEADERS frame and as many CONTINUATIONs as it needs.
    fn emit_frames(&mut self, block: &Block, hpack: &[u8]) {
        let prio_len = if block.flags & PRIORITY != 0 { 5 } else { 0 };
        let first = hpack.len().min(OUT_FRAME - prio_len);
        let (head, mut rest) = hpack.split_at(first);
        let mut flags = block.flags;
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        self.frame_head(prio_len + head.len(), HEADERS, flags, block.stream);
        if prio_len > 0 {
            self.output.extend_from_slice(&block.priority);
        }
        self.output.extend_from_slice(head);
        while !rest.is_empty() {
            let n = rest.len().min(OUT_FRAME);
            let (chunk, tail) = rest.split_at(n);
            let flags = if tail.is_empty() { END_HEADERS } else { 0 };
            self.frame_head(n, CONTINUATION, flags, block.stream);
            self.output.extend_from_slice(chunk);
            rest = tail;
        }
    }

    fn frame_head(&mut self, len: usize, kind: u8, flags: u8, stream: u32) {
        // `len` <= OUT_FRAME < 2^24, so the three bytes hold it.
        self.output.put_uint(len as u64, 3);
        self.output.put_u8(kind);
        self.output.put_u8(flags);
        self.output.put_u32(stream);
    }
}

/// RFC 7541 §6.2.2: a literal field, new name, not added to the dynamic table.
fn literal_without_indexing(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0);
    for s in [name, value] {
        encode_integer(s.len(), 7, 0, out);
        out.extend_from_slice(s);
    }
}

/// An accepted stream with the client-to-server direction passed through a [`Rewriter`].
pub struct AuthorityLayer<S> {
    inner: S,
    rewriter: Rewriter,
    eof: bool,
    reported: bool,
}

impl<S> AuthorityLayer<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            rewriter: Rewriter::new(),
            eof: false,
            reported: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityLayer<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Settled connections too are read in READ_CHUNK pieces and handed to h2 from the
        // buffer, on purpose: h2 reads the socket in small pieces on its own, and with
        // 16-64 concurrent streams the bare tonic server serves 1.1-1.4x the requests
        // behind this layer than without it (docs/benchmarks.md, "bare tonic + authority
        // layer"). Reading straight into h2's buffer made that gain disappear.
        loop {
            let out = this.rewriter.output();
            if !out.is_empty() {
                let n = out.len().min(buf.remaining());
                buf.put_slice(&out[..n]);
                out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                this.eof = true;
                continue;
            }
            let before = this.rewriter.rewritten();
            if let Err(e) = this.rewriter.feed(rb.filled()) {
                tracing::warn!(
                    error = %e,
                    "closing a KMS socket connection: the client sent HTTP/2 this plugin cannot serve"
                );
                return Poll::Ready(Err(e.into()));
            }
            if !this.reported && this.rewriter.rewritten() > before {
                this.reported = true;
                tracing::debug!(
                    authority = this.rewriter.first_replaced().unwrap_or_default(),
                    "a client on the KMS socket sends an :authority h2 cannot parse (the socket \
                     path, as older kube-apiservers do); serving it as localhost"
                );
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityLayer<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityLayer<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    fn request(authority: Option<&[u8]>, path: &[u8]) -> Fields {
        let mut f: Fields = vec![
            (b":method".to_vec(), b"POST".to_vec()),
            (b":scheme".to_vec(), b"http".to_vec()),
            (b":path".to_vec(), path.to_vec()),
        ];
        if let Some(a) = authority {
            f.push((b":authority".to_vec(), a.to_vec()));
        }
        f.push((b"content-type".to_vec(), b"application/grpc".to_vec()));
        f.push((b"te".to_vec(), b"trailers".to_vec()));
        f
    }

    use edgeseal_test_support::h2_frame as frame;

    /// A client's view: its own HPACK encoder (with the dynamic table, as grpc-go's).
    struct Client {
        enc: loona_hpack::Encoder<'static>,
        bytes: Vec<u8>,
        stream: u32,
    }

    impl Client {
        fn new() -> Self {
            Self {
                enc: loona_hpack::Encoder::new(),
                bytes: PREFACE.to_vec(),
                stream: 1,
            }
        }

        /// A request's HEADERS (split over CONTINUATIONs of `split` bytes) and a DATA frame.
        fn request(&mut self, fields: &Fields, split: usize, data: &[u8]) {
            let block = self
                .enc
                .encode(fields.iter().map(|(n, v)| (&n[..], &v[..])));
            let chunks: Vec<&[u8]> = block.chunks(split).collect();
            for (i, c) in chunks.iter().enumerate() {
                let last = if i + 1 == chunks.len() {
                    END_HEADERS
                } else {
                    0
                };
                let kind = if i == 0 { HEADERS } else { CONTINUATION };
                self.bytes.extend(frame(kind, last, self.stream, c));
            }
            self.bytes.extend(frame(0x0, END_STREAM, self.stream, data));
            self.stream += 2;
        }
    }

    /// The server's view (as `h2` parses it): frames, and each block decoded with a fresh
    /// decoder of its own.
    fn server_view(mut bytes: &[u8]) -> (Vec<Fields>, Vec<Vec<u8>>) {
        assert_eq!(&bytes[..PREFACE.len()], PREFACE);
        bytes = &bytes[PREFACE.len()..];
        let mut dec = loona_hpack::Decoder::new();
        let (mut blocks, mut data) = (Vec::new(), Vec::new());
        let mut frag = Vec::new();
        while !bytes.is_empty() {
            let len = (bytes[0] as usize) << 16 | (bytes[1] as usize) << 8 | bytes[2] as usize;
            let (kind, flags) = (bytes[3], bytes[4]);
            let mut payload = &bytes[9..9 + len];
            match kind {
                HEADERS | CONTINUATION => {
                    if kind == HEADERS && flags & PADDED != 0 {
                        let pad = payload[0] as usize;
                        payload = &payload[1..payload.len() - pad];
                    }
                    if kind == HEADERS && flags & PRIORITY != 0 {
                        payload = &payload[5..];
                    }
                    assert!(payload.len() <= OUT_FRAME);
                    frag.extend_from_slice(payload);
                    if flags & END_HEADERS != 0 {
                        blocks.push(dec.decode(&frag).unwrap());
                        frag.clear();
                    }
                }
                _ => data.push(payload.to_vec()),
            }
            bytes = &bytes[9 + len..];
        }
        (blocks, data)
    }

    fn run(input: &[u8], chunk: usize) -> Result<Vec<u8>, FrameError> {
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        for c in input.chunks(chunk) {
            r.feed(c)?;
            out.extend_from_slice(&r.output().split());
        }
        Ok(out)
    }

    #[test]
    fn authority_check_matches_h2() {
        for bad in [
            &b"/var/run/kms.sock"[..],
            b"var/run/kms.sock",
            b"%2Fvar%2Frun%2Fkms.sock",
            b"",
            b"@abstract/name",
        ] {
            assert!(
                !authority_is_valid(bad),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        for good in [&b"localhost"[..], b"localhost:1", b"kms", b"127.0.0.1"] {
            assert!(authority_is_valid(good));
        }
    }

    #[test]
    fn a_valid_authority_passes_byte_for_byte() {
        let mut c = Client::new();
        for i in 0..5 {
            c.request(
                &request(Some(b"localhost"), b"/v2.KeyManagementService/Status"),
                1000,
                &[i],
            );
        }
        for chunk in [1, 7, 4096] {
            assert_eq!(run(&c.bytes, chunk).unwrap(), c.bytes);
        }
    }

    #[test]
    fn a_connection_settled_by_its_first_block_is_not_decoded_again() {
        let mut c = Client::new();
        c.request(&request(Some(b"localhost"), b"/p"), 4096, b"");
        // Bytes that are not HPACK at all: h2 refuses them itself, the layer no longer looks.
        c.bytes
            .extend(frame(HEADERS, END_HEADERS, 3, &[0xff, 0x7f]));
        assert_eq!(run(&c.bytes, 5).unwrap(), c.bytes);
    }

    #[test]
    fn path_authorities_become_localhost_and_all_else_survives() {
        for authority in [
            &b"/var/run/kmsplugin/socket.sock"[..],
            b"%2Ftmp%2Fkms.sock",
            b"",
        ] {
            let mut c = Client::new();
            let mut expected = Vec::new();
            // A first request that needs the change, then more (one with a valid authority
            // among them): the dynamic table entries the client makes along the way must
            // still resolve.
            let mut first = request(Some(authority), b"/grpc.health.v1.Health/Check");
            c.request(&first, 4096, b"a");
            first[3].1 = b"localhost".to_vec();
            expected.push(first);
            for i in 0..20u8 {
                let a = if i == 10 {
                    &b"localhost"[..]
                } else {
                    authority
                };
                let mut f = request(Some(a), b"/v2.KeyManagementService/Encrypt");
                f.push((b"grpc-timeout".to_vec(), format!("{i}m").into_bytes()));
                c.request(&f, 3, &[i]);
                for (n, v) in f.iter_mut() {
                    if n == b":authority" {
                        *v = b"localhost".to_vec();
                    }
                }
                expected.push(f);
            }
            for chunk in [1, 5, 100, 65536] {
                let out = run(&c.bytes, chunk).unwrap();
                let (blocks, data) = server_view(&out);
                assert_eq!(blocks, expected);
                let want: Vec<Vec<u8>> = std::iter::once(b"a".to_vec())
                    .chain((0..20u8).map(|i| vec![i]))
                    .collect();
                assert_eq!(data, want);
            }
        }
    }

    #[test]
    fn a_missing_authority_is_left_missing() {
        let mut c = Client::new();
        c.request(
            &request(None, b"/v2.KeyManagementService/Status"),
            4096,
            b"",
        );
        assert_eq!(run(&c.bytes, 3).unwrap(), c.bytes);
    }

    #[test]
    fn padding_and_priority_are_handled() {
        let mut enc = loona_hpack::Encoder::new();
        let f = request(Some(b"/x.sock"), b"/p");
        let block = enc.encode(f.iter().map(|(n, v)| (&n[..], &v[..])));
        let mut payload = vec![4u8]; // pad length
        payload.extend_from_slice(&[0x80, 0, 0, 3, 15]); // exclusive dependency on 3, weight 15
        payload.extend_from_slice(&block);
        payload.extend_from_slice(&[0; 4]);
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(
            HEADERS,
            PADDED | PRIORITY | END_HEADERS | END_STREAM,
            5,
            &payload,
        ));
        let out = run(&bytes, 2).unwrap();
        let (blocks, _) = server_view(&out);
        assert_eq!(
            blocks[0][3],
            (b":authority".to_vec(), b"localhost".to_vec())
        );
        // The priority and END_STREAM survive; the padding is dropped.
        let head = &out[PREFACE.len()..PREFACE.len() + 9];
        assert_eq!(head[4], PRIORITY | END_HEADERS | END_STREAM);
        assert_eq!(
            &out[PREFACE.len() + 9..PREFACE.len() + 14],
            &[0x80, 0, 0, 3, 15]
        );
        assert_eq!(u32::from_be_bytes(head[5..9].try_into().unwrap()), 5);
    }

    #[test]
    fn a_large_reencoded_block_is_split_into_frames() {
        let mut c = Client::new();
        let mut f = request(Some(b"/x.sock"), b"/p");
        f.push((b"x-big".to_vec(), vec![b'a'; 40_000]));
        c.request(&f, 16_384, b"");
        let out = run(&c.bytes, 1000).unwrap();
        let (blocks, _) = server_view(&out);
        assert_eq!(blocks[0].last().unwrap().1.len(), 40_000);
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let cases: Vec<Vec<u8>> = vec![
            // CONTINUATION with no HEADERS before it.
            frame(CONTINUATION, END_HEADERS, 1, &[0x82]),
            // A DATA frame in the middle of a header block.
            [frame(HEADERS, 0, 1, &[0x82]), frame(0, 0, 1, b"x")].concat(),
            // An index past both tables.
            frame(HEADERS, END_HEADERS, 1, &[0xff, 0x7f]),
            // A table size update above what the server allows.
            frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xe1, 0xff, 0x03, 0x82]),
            // Padding longer than the frame.
            frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82]),
            // A frame too large to buffer.
            frame(HEADERS, 0, 1, &vec![0; MAX_BLOCK + 1]),
            frame(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2]),
        ];
        for case in cases {
            let bytes = [PREFACE, &case].concat();
            assert!(run(&bytes, 3).is_err());
        }
        // One literal repeated by index until it decodes past the limit.
        let mut block = vec![0x40, 1, b'x'];
        let _ = loona_hpack::encoder::encode_integer_into(3000, 7, 0, &mut block);
        block.extend(std::iter::repeat_n(b'y', 3000));
        block.extend(std::iter::repeat_n(0x80 | 62, 200));
        let bytes = [PREFACE, &frame(HEADERS, END_HEADERS, 1, &block)].concat();
        assert!(matches!(
            run(&bytes, 4096),
            Err(FrameError::DecodedTooLarge)
        ));
    }

    /// The stream wrapper gives h2 what the rewriter gives, settled or not, however the
    /// client's writes are cut.
    #[tokio::test]
    async fn the_stream_layer_reads_what_the_rewriter_writes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for authority in [&b"localhost"[..], b"/var/run/kms.sock"] {
            let mut c = Client::new();
            for i in 0..50u8 {
                c.request(&request(Some(authority), b"/p"), 40, &[i; 300]);
            }
            let expected = run(&c.bytes, 4096).unwrap();
            let (mut client, server) = tokio::io::duplex(1024);
            let bytes = c.bytes.clone();
            let writer = tokio::spawn(async move {
                for chunk in bytes.chunks(777) {
                    client.write_all(chunk).await.unwrap();
                }
            });
            let mut layer = AuthorityLayer::new(server);
            let mut got = Vec::new();
            let mut buf = [0u8; 100];
            while got.len() < expected.len() {
                let n = layer.read(&mut buf).await.unwrap();
                assert!(n > 0, "early EOF");
                got.extend_from_slice(&buf[..n]);
            }
            writer.await.unwrap();
            assert_eq!(got, expected);
            if authority == b"localhost" {
                assert_eq!(got, c.bytes, "a settled connection is passed byte for byte");
            }
        }
    }

    #[test]
    fn not_http2_is_passed_through_for_h2_to_refuse() {
        let bytes = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(run(bytes, 4).unwrap(), bytes);
    }
}
