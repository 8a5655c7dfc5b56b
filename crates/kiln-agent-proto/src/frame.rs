//! Framing: how messages travel over one byte stream (a virtio-serial port or a unix socket).
//!
//! A byte stream from the host can be cut at any point (QEMU killed, host reconnecting,
//! snapshot restored into a new QEMU while the guest keeps the same open port), so the
//! format is built for *resynchronisation*:
//!
//! - Every connection starts with [`SYNC`] (16 bytes that never begin a frame header)
//!   followed by a `Hello` control frame. A decoder in [`Decoder::new_hunting`] state
//!   discards bytes until it sees [`SYNC`].
//! - Each frame has a 12-byte header: `0xA7, VERSION, kind, channel, stream: u32 BE,
//!   len: u32 BE`, then `len` payload bytes. A header that does not validate throws the
//!   decoder back into hunting instead of trusting garbage lengths.
//! - A payload longer than the decoder's limit is *skipped* (never buffered) and reported
//!   as [`DecodeEvent::Oversized`] so the receiver can fail just that stream.
//! - [`Decoder::expire_partial`] lets a receiver give up on a frame that stopped arriving
//!   mid-way (the writer died) and rescan the bytes already received for [`SYNC`].
//!
//! Data payloads are raw bytes (no base64); control payloads are JSON (see `msg`).

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Resynchronisation marker written before every `Hello` / `HelloAck`.
/// Its first byte differs from [`HEADER_MAGIC`] so a decoder at a frame boundary can tell
/// the two apart.
pub const SYNC: [u8; 16] = [
    0xF0, 0x9F, 0x94, 0xA5, b'K', b'I', b'L', b'N', b'-', b'S', b'Y', b'N', b'C', 0x00, 0xC3, 0x5A,
];

/// First byte of every frame header.
pub const HEADER_MAGIC: u8 = 0xA7;
/// Framing version (second header byte). Bumped only on incompatible header changes.
pub const FRAME_VERSION: u8 = 1;
/// Size of a frame header in bytes.
pub const HEADER_LEN: usize = 12;
/// Hard upper bound on a frame payload accepted by default (1 MiB).
pub const MAX_FRAME: usize = 1024 * 1024;
/// Size senders use for data chunks (file contents, stdout, stdin). Far below
/// [`MAX_FRAME`] so one stream cannot monopolise the link for long.
pub const DATA_CHUNK: usize = 64 * 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// A JSON control message (`msg::HostMsg` or `msg::AgentMsg`).
    Control = 1,
    /// Raw bytes on `channel`.
    Data = 2,
    /// End of the byte stream on `channel` (empty payload).
    Eof = 3,
}

impl FrameKind {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Control),
            2 => Some(Self::Data),
            3 => Some(Self::Eof),
            _ => None,
        }
    }
}

/// Data channel numbers used in [`Frame::channel`].
pub mod channel {
    /// Host -> agent bytes: exec stdin, file write contents.
    pub const INPUT: u8 = 0;
    /// Agent -> host: exec stdout, file read contents.
    pub const STDOUT: u8 = 1;
    /// Agent -> host: exec stderr.
    pub const STDERR: u8 = 2;
}

/// One frame. `stream` 0 is the connection itself (hello); requests use ids >= 1,
/// chosen by the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub channel: u8,
    pub stream: u32,
    pub payload: Bytes,
}

impl Frame {
    /// A control frame carrying already-serialised JSON.
    pub fn control(stream: u32, json: impl Into<Bytes>) -> Self {
        Self {
            kind: FrameKind::Control,
            channel: 0,
            stream,
            payload: json.into(),
        }
    }

    /// A data frame.
    pub fn data(stream: u32, channel: u8, bytes: impl Into<Bytes>) -> Self {
        Self {
            kind: FrameKind::Data,
            channel,
            stream,
            payload: bytes.into(),
        }
    }

    /// End of data on a channel.
    pub fn eof(stream: u32, channel: u8) -> Self {
        Self {
            kind: FrameKind::Eof,
            channel,
            stream,
            payload: Bytes::new(),
        }
    }

    /// Append the wire form to `out`.
    ///
    /// # Panics
    /// If the payload is larger than `u32::MAX` (callers chunk to [`DATA_CHUNK`]).
    pub fn encode_into(&self, out: &mut BytesMut) {
        let len = u32::try_from(self.payload.len()).expect("frame payload exceeds u32");
        out.reserve(HEADER_LEN + self.payload.len());
        out.put_u8(HEADER_MAGIC);
        out.put_u8(FRAME_VERSION);
        out.put_u8(self.kind as u8);
        out.put_u8(self.channel);
        out.put_u32(self.stream);
        out.put_u32(len);
        out.put_slice(&self.payload);
    }

    /// The wire form as a fresh buffer.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(HEADER_LEN + self.payload.len());
        self.encode_into(&mut b);
        b.freeze()
    }
}

/// What [`Decoder::next_event`] produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeEvent {
    /// A [`SYNC`] marker was consumed: the peer (re)started a connection. Receivers reset
    /// per-connection state.
    Sync,
    /// A complete frame.
    Frame(Frame),
    /// A frame header announced `len` > the limit; its payload is being skipped.
    /// The receiver should fail `stream` with a `frame_too_large` error.
    Oversized { stream: u32, len: u32 },
    /// Bytes that did not form a valid header were met; the decoder is hunting for
    /// [`SYNC`] again (reported once per loss of sync).
    Desync,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Hunting,
    Header,
    Payload {
        kind: FrameKind,
        channel: u8,
        stream: u32,
        len: usize,
    },
    Skip {
        remaining: u64,
    },
}

/// Incremental, push-based decoder shared by the agent (blocking I/O) and the client (tokio).
///
/// Memory use is bounded by `max_payload + HEADER_LEN` plus whatever the caller pushes in
/// one [`Decoder::push`] call.
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    state: State,
    max_payload: usize,
}

impl Decoder {
    /// A decoder that starts at a frame boundary (already synchronised).
    pub fn new(max_payload: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            state: State::Header,
            max_payload,
        }
    }

    /// A decoder that discards everything until a [`SYNC`] marker. Both ends start this way.
    pub fn new_hunting(max_payload: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            state: State::Hunting,
            max_payload,
        }
    }

    /// Add received bytes.
    pub fn push(&mut self, data: &[u8]) {
        if let State::Skip { remaining } = self.state {
            // Do not even buffer bytes we are going to skip.
            let n = (data.len() as u64).min(remaining) as usize;
            let remaining = remaining - n as u64;
            self.state = if remaining == 0 {
                State::Header
            } else {
                State::Skip { remaining }
            };
            self.buf.extend_from_slice(&data[n..]);
            return;
        }
        self.buf.extend_from_slice(data);
    }

    /// Forget everything and hunt for [`SYNC`] (used when the transport reports a disconnect).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.state = State::Hunting;
    }

    /// True while a frame has started but not completed.
    pub fn is_mid_frame(&self) -> bool {
        match self.state {
            State::Hunting => false,
            State::Header => !self.buf.is_empty(),
            State::Payload { .. } | State::Skip { .. } => true,
        }
    }

    /// True while skipping the payload of an oversized frame.
    pub fn is_skipping(&self) -> bool {
        matches!(self.state, State::Skip { .. })
    }

    /// Whether the bytes buffered for an incomplete frame contain a [`SYNC`] marker:
    /// evidence that a new writer started while the old one's frame never finished.
    pub fn partial_has_sync(&self) -> bool {
        self.is_mid_frame() && find(&self.buf, &SYNC).is_some()
    }

    /// True while hunting for [`SYNC`].
    pub fn is_hunting(&self) -> bool {
        self.state == State::Hunting
    }

    /// Give up on the frame in progress (its writer went away) and resume at the **last**
    /// [`SYNC`] buffered: the newest writer's start (a host sends SYNC only when it
    /// connects, with each hello). Resuming at the first one instead would re-enter the
    /// stale frames the old writer left half-sent, one deadline each, before the new
    /// host's hello got through. Returns whether a partial frame was dropped.
    pub fn expire_partial(&mut self) -> bool {
        if !self.is_mid_frame() {
            return false;
        }
        if let Some(pos) = rfind(&self.buf, &SYNC) {
            self.buf.advance(pos);
        }
        self.state = State::Hunting;
        true
    }

    /// Next decoded event, or `None` if more bytes are needed.
    pub fn next_event(&mut self) -> Option<DecodeEvent> {
        loop {
            match self.state {
                State::Hunting => {
                    if let Some(pos) = find(&self.buf, &SYNC) {
                        self.buf.advance(pos + SYNC.len());
                        self.state = State::Header;
                        return Some(DecodeEvent::Sync);
                    }
                    // Keep a tail that could be the start of a marker.
                    let keep = SYNC.len() - 1;
                    if self.buf.len() > keep {
                        let drop = self.buf.len() - keep;
                        self.buf.advance(drop);
                    }
                    return None;
                }
                State::Header => {
                    let first = *self.buf.first()?;
                    if first == SYNC[0] {
                        if self.buf.len() < SYNC.len() {
                            if SYNC.starts_with(&self.buf) {
                                return None;
                            }
                        } else if self.buf[..SYNC.len()] == SYNC {
                            self.buf.advance(SYNC.len());
                            return Some(DecodeEvent::Sync);
                        }
                        return Some(self.desync());
                    }
                    if self.buf.len() < HEADER_LEN {
                        if first != HEADER_MAGIC
                            || (self.buf.len() >= 2 && self.buf[1] != FRAME_VERSION)
                        {
                            return Some(self.desync());
                        }
                        return None;
                    }
                    let h = &self.buf[..HEADER_LEN];
                    let kind = FrameKind::from_u8(h[2]);
                    let (Some(kind), true, true) =
                        (kind, h[0] == HEADER_MAGIC, h[1] == FRAME_VERSION)
                    else {
                        return Some(self.desync());
                    };
                    let channel = h[3];
                    let stream = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                    let len = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
                    self.buf.advance(HEADER_LEN);
                    if len as usize > self.max_payload {
                        let skip_now = self.buf.len().min(len as usize);
                        self.buf.advance(skip_now);
                        let remaining = u64::from(len) - skip_now as u64;
                        self.state = if remaining == 0 {
                            State::Header
                        } else {
                            State::Skip { remaining }
                        };
                        return Some(DecodeEvent::Oversized { stream, len });
                    }
                    self.state = State::Payload {
                        kind,
                        channel,
                        stream,
                        len: len as usize,
                    };
                }
                State::Payload {
                    kind,
                    channel,
                    stream,
                    len,
                } => {
                    if self.buf.len() < len {
                        self.buf.reserve(len - self.buf.len());
                        return None;
                    }
                    let payload = self.buf.split_to(len).freeze();
                    self.state = State::Header;
                    return Some(DecodeEvent::Frame(Frame {
                        kind,
                        channel,
                        stream,
                        payload,
                    }));
                }
                State::Skip { remaining } => {
                    let n = (self.buf.len() as u64).min(remaining);
                    self.buf.advance(n as usize);
                    let remaining = remaining - n;
                    if remaining == 0 {
                        self.state = State::Header;
                    } else {
                        self.state = State::Skip { remaining };
                        return None;
                    }
                }
            }
        }
    }

    fn desync(&mut self) -> DecodeEvent {
        // Drop one byte so the hunt does not rematch the same position, then hunt.
        self.buf.advance(1);
        self.state = State::Hunting;
        DecodeEvent::Desync
    }
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).rposition(|w| w == needle)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(d: &mut Decoder) -> Vec<DecodeEvent> {
        let mut v = Vec::new();
        while let Some(e) = d.next_event() {
            v.push(e);
        }
        v
    }

    /// What a new writer sends first: SYNC, then its hello.
    fn push_new_hello(b: &mut BytesMut) {
        b.extend_from_slice(&SYNC);
        Frame::control(0, &b"hello"[..]).encode_into(b);
    }

    /// `d` is stuck in a partial frame, and expiring it recovers the new writer's hello.
    fn assert_expiry_finds_the_hello(d: &mut Decoder) {
        assert!(d.is_mid_frame());
        assert!(d.expire_partial());
        assert_eq!(
            decode_all(d),
            vec![
                DecodeEvent::Sync,
                DecodeEvent::Frame(Frame::control(0, &b"hello"[..]))
            ]
        );
    }

    #[test]
    fn hunting_skips_garbage_until_sync() {
        let mut d = Decoder::new_hunting(MAX_FRAME);
        let mut b = BytesMut::new();
        b.extend_from_slice(b"garbage\xA7\x01\x01\x00junk");
        b.extend_from_slice(&SYNC);
        Frame::control(0, &b"{}"[..]).encode_into(&mut b);
        d.push(&b);
        let ev = decode_all(&mut d);
        assert_eq!(
            ev,
            vec![
                DecodeEvent::Sync,
                DecodeEvent::Frame(Frame::control(0, &b"{}"[..]))
            ]
        );
    }

    #[test]
    fn bad_header_desyncs_then_resyncs() {
        let mut d = Decoder::new(MAX_FRAME);
        let mut b = BytesMut::new();
        b.extend_from_slice(&[0xA7, 0x01, 0x09, 0, 0, 0, 0, 1, 0, 0, 0, 0]);
        b.extend_from_slice(&SYNC);
        Frame::data(3, 1, &b"x"[..]).encode_into(&mut b);
        d.push(&b);
        let ev = decode_all(&mut d);
        assert_eq!(
            ev,
            vec![
                DecodeEvent::Desync,
                DecodeEvent::Sync,
                DecodeEvent::Frame(Frame::data(3, 1, &b"x"[..]))
            ]
        );
    }

    #[test]
    fn oversized_is_skipped_without_buffering() {
        let mut d = Decoder::new(16);
        let mut b = BytesMut::new();
        Frame::data(5, 0, vec![7u8; 100]).encode_into(&mut b);
        Frame::data(6, 0, &b"ok"[..]).encode_into(&mut b);
        // Feed byte by byte to exercise the skip path.
        let mut ev = Vec::new();
        for byte in &b {
            d.push(std::slice::from_ref(byte));
            ev.extend(decode_all(&mut d));
            assert!(d.buf.len() <= 16 + HEADER_LEN);
        }
        assert_eq!(
            ev,
            vec![
                DecodeEvent::Oversized {
                    stream: 5,
                    len: 100
                },
                DecodeEvent::Frame(Frame::data(6, 0, &b"ok"[..]))
            ]
        );
    }

    #[test]
    fn expire_partial_finds_sync_inside_dropped_payload() {
        // An old writer died mid-frame; the new writer's SYNC+frame landed inside the
        // announced payload. Expiring the partial frame must recover it.
        let mut d = Decoder::new(MAX_FRAME);
        let mut b = BytesMut::new();
        let full = Frame::data(1, 0, vec![1u8; 1000]).encode();
        b.extend_from_slice(&full[..HEADER_LEN + 10]);
        push_new_hello(&mut b);
        d.push(&b);
        assert_eq!(decode_all(&mut d), vec![]);
        assert_expiry_finds_the_hello(&mut d);
    }

    #[test]
    fn expire_partial_resumes_at_the_newest_writer_not_inside_older_stale_frames() {
        // Found by the guest_stream fuzz target: an old writer left several frames
        // half-sent, each after a SYNC, inside each other's announced payloads. One expiry
        // must reach the new host's hello, not the next stale frame (one deadline each).
        let mut d = Decoder::new(MAX_FRAME);
        let mut b = BytesMut::new();
        for stream in [1, 2, 3] {
            b.extend_from_slice(&SYNC);
            let stale = Frame::data(stream, 0, vec![0u8; 5000]).encode();
            b.extend_from_slice(&stale[..HEADER_LEN + 7]);
        }
        push_new_hello(&mut b);
        d.push(&b);
        let _ = decode_all(&mut d);
        assert_expiry_finds_the_hello(&mut d);
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        (
            prop_oneof![
                Just(FrameKind::Control),
                Just(FrameKind::Data),
                Just(FrameKind::Eof)
            ],
            any::<u8>(),
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..2048),
        )
            .prop_map(|(kind, channel, stream, payload)| Frame {
                kind,
                channel,
                stream,
                payload: payload.into(),
            })
    }

    proptest! {
        #[test]
        fn roundtrip_any_split(frames in proptest::collection::vec(arb_frame(), 0..20), cuts in proptest::collection::vec(1usize..4096, 1..10)) {
            let mut wire = BytesMut::new();
            wire.extend_from_slice(&SYNC);
            for f in &frames {
                f.encode_into(&mut wire);
            }
            let mut d = Decoder::new_hunting(MAX_FRAME);
            let mut out = Vec::new();
            let mut rest: &[u8] = &wire;
            let mut i = 0;
            while !rest.is_empty() {
                let n = cuts[i % cuts.len()].min(rest.len());
                d.push(&rest[..n]);
                rest = &rest[n..];
                i += 1;
                while let Some(ev) = d.next_event() {
                    out.push(ev);
                }
            }
            let mut expected = vec![DecodeEvent::Sync];
            expected.extend(frames.into_iter().map(DecodeEvent::Frame));
            prop_assert_eq!(out, expected);
        }

        #[test]
        fn garbage_never_panics_and_stays_bounded(data in proptest::collection::vec(any::<u8>(), 0..8192)) {
            let mut d = Decoder::new(256);
            d.push(&data);
            let mut n = 0;
            while let Some(ev) = d.next_event() {
                if let DecodeEvent::Frame(f) = ev {
                    prop_assert!(f.payload.len() <= 256);
                }
                n += 1;
                prop_assert!(n <= data.len() + 1);
            }
        }
    }
}
