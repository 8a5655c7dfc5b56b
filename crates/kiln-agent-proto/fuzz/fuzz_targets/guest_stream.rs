//! The guest agent's side of the byte stream, as `kiln-agent` runs it (PID 1, reading the
//! virtio-serial port): `Decoder::new_hunting(MAX_FRAME)`, the reader loop of
//! `crates/kiln-agent/src/server.rs` (`serve`, `drain`, `try_expire`: partial frames
//! abandoned after `FRAME_DEADLINE` when a SYNC is buffered or an oversized frame is being
//! skipped, a port hang-up resetting the decoder), and its control-message handling
//! (`MAX_CONTROL`, `HostMsg` JSON, hello only on stream 0). The agent is a binary crate, so
//! that loop is mirrored here, with a virtual clock: keep the two in step.
//!
//! The input is a script of host-side events: raw bytes, well-formed or lying frames,
//! (partial) SYNC markers, time passing, port hang-ups. Checked:
//! - nothing panics, no frame payload exceeds `MAX_FRAME`;
//! - every decoded frame re-encodes to bytes that decode to the same frame, and every
//!   control payload that parses as `HostMsg` (or `AgentMsg`, the host side's type)
//!   survives a JSON round trip;
//! - the decoder does not depend on how bytes are split: when no partial frame was
//!   expired and no hang-up reset it, the events equal those of one decoder fed the whole
//!   stream at once;
//! - whatever garbage came before, a fresh host that does what `AgentClient::connect_unix`
//!   does (SYNC + hello, resent every second) gets its hello through within a few resends:
//!   a hostile or half-dead previous writer cannot wedge the agent.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use bytes::BytesMut;
use kiln_agent_proto::frame::{MAX_FRAME, SYNC};
use kiln_agent_proto::{
    AgentMsg, DecodeEvent, Decoder, Frame, FrameKind, HostMsg, MAX_CONTROL, PROTOCOL_VERSION,
};
use libfuzzer_sys::fuzz_target;

/// `server::FRAME_DEADLINE`.
const FRAME_DEADLINE_MS: u64 = 2000;
/// The host's hello resend interval (`client::handshake`).
const RESEND_MS: u64 = 1000;
/// Resends a fresh host is allowed before the agent counts as wedged.
const MAX_RESENDS: usize = 5;

const SAMPLES: &[&str] = &[
    r#"{"type":"hello","nonce":7,"protocol":1}"#,
    r#"{"type":"health"}"#,
    r#"{"type":"set_clock","unix_nanos":-1}"#,
    r#"{"type":"set_defaults","defaults":{"env":{"A":"b"},"cwd":"/","user":"root:root"}}"#,
    r#"{"type":"get_defaults"}"#,
    r#"{"type":"exec","command":"true","env":{},"cwd":null,"user":null,"stdin":true,"timeout_ms":5,"background":{"log_path":"/x"}}"#,
    r#"{"type":"signal","signal":15}"#,
    r#"{"type":"credit","bytes":4294967295}"#,
    r#"{"type":"wait_pid","pid":1,"timeout_ms":0}"#,
    r#"{"type":"kill_pid","pid":-1,"signal":9,"group":true}"#,
    r#"{"type":"read_file","path":"/etc/passwd","offset":0,"limit":null}"#,
    r#"{"type":"write_file","path":"/tmp/x","mode":420,"owner":"a:b","create_parents":false,"append":true}"#,
    r#"{"type":"stat","path":"/"}"#,
    r#"{"type":"list_dir","path":"/"}"#,
    r#"{"type":"mkdir","path":"/a","mode":511}"#,
    r#"{"type":"remove","path":"/a","recursive":true}"#,
    r#"{"type":"hello_ack","nonce":1,"protocol":1,"pid":1,"boot_id":"b","agent_version":"v"}"#,
    r#"{"type":"exit","code":null,"signal":9,"timed_out":true}"#,
    r#"{"type":"dir_entries","entries":[{"name":"a","stat":{"kind":"symlink","size":1,"mode":511,"uid":0,"gid":0,"mtime_unix_nanos":-5,"link_target":"b"}}]}"#,
    r#"{"type":"error","code":"from_the_future","message":"x"}"#,
    r#"{"type":"pid_status","pid":3,"alive":false,"exit":{"code":0,"signal":null}}"#,
];

#[derive(Debug, Arbitrary)]
enum Payload {
    Sample(u8),
    /// A sample with one byte replaced.
    Mutated(u8, u16, u8),
    Raw(Vec<u8>),
    /// Filler: a few bytes, or just under / at / over `MAX_CONTROL` and `MAX_FRAME`.
    Fill(u8, u16),
}

#[derive(Debug, Arbitrary)]
enum Op {
    Bytes(Vec<u8>),
    Frame {
        kind: u8,
        channel: u8,
        stream: u8,
        payload: Payload,
        /// Deliver in pieces of this size (0: at once).
        split: u16,
    },
    /// A header that announces `len` bytes, followed by only `give` of them.
    Header {
        stream: u8,
        len: u32,
        give: u16,
    },
    Sync,
    PartialSync(u8),
    Tick(u16),
    Hup,
}

#[derive(Debug, Arbitrary)]
struct Script {
    ops: Vec<Op>,
    /// Whether the port reports the old host's hang-up before the new host writes.
    hup_before_host: bool,
    nonce: u64,
}

fn payload_bytes(p: &Payload) -> Vec<u8> {
    match p {
        Payload::Sample(i) => SAMPLES[usize::from(*i) % SAMPLES.len()].as_bytes().to_vec(),
        Payload::Mutated(i, at, b) => {
            let mut v = SAMPLES[usize::from(*i) % SAMPLES.len()].as_bytes().to_vec();
            let at = usize::from(*at) % v.len();
            v[at] = *b;
            v
        }
        Payload::Raw(v) => v.clone(),
        Payload::Fill(which, n) => {
            let n = usize::from(*n);
            // Big ones are rare: hunting through a megabyte goes through libFuzzer's
            // memcmp hook once per byte and would dominate the run.
            let len = match which % 32 {
                0 => MAX_CONTROL - n % 64,
                1 => MAX_CONTROL + 1 + n % 64,
                2 => MAX_FRAME - n % 64,
                3 => MAX_FRAME + 1 + n % 64,
                _ => n % 4096,
            };
            vec![b' '; len]
        }
    }
}

/// A decoded event, with large payloads sampled: comparing whole megabyte payloads goes
/// through libFuzzer's memcmp hook and costs more than everything else together.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Sync,
    Desync,
    Oversized { stream: u32, len: u32 },
    Frame {
        kind: FrameKind,
        channel: u8,
        stream: u32,
        len: usize,
        sample: Vec<u8>,
    },
}

fn sample(p: &[u8]) -> Vec<u8> {
    if p.len() <= 256 {
        return p.to_vec();
    }
    let mut v = p[..64].to_vec();
    v.extend(p.iter().step_by(4093).copied());
    v.extend_from_slice(&p[p.len() - 64..]);
    v
}

impl From<&DecodeEvent> for Seen {
    fn from(ev: &DecodeEvent) -> Self {
        match ev {
            DecodeEvent::Sync => Seen::Sync,
            DecodeEvent::Desync => Seen::Desync,
            DecodeEvent::Oversized { stream, len } => Seen::Oversized {
                stream: *stream,
                len: *len,
            },
            DecodeEvent::Frame(f) => Seen::Frame {
                kind: f.kind,
                channel: f.channel,
                stream: f.stream,
                len: f.payload.len(),
                sample: sample(&f.payload),
            },
        }
    }
}

/// The agent's reader loop, on a virtual clock.
struct Agent {
    dec: Decoder,
    now: u64,
    frame_started: Option<u64>,
    /// Events, in order, for the split-invariance comparison.
    seen: Vec<Seen>,
    /// Nonces of hellos the agent accepted (stream 0, `HostMsg::Hello`).
    hellos: Vec<u64>,
    /// An expiry or reset happened: the byte stream was not decoded as one.
    disturbed: bool,
}

impl Agent {
    fn new() -> Self {
        Self {
            dec: Decoder::new_hunting(MAX_FRAME),
            now: 0,
            frame_started: None,
            seen: Vec::new(),
            hellos: Vec::new(),
            disturbed: false,
        }
    }

    /// `server::drain` + `handle_frame`, minus the side effects.
    fn drain(&mut self) -> bool {
        let mut any = false;
        while let Some(ev) = self.dec.next_event() {
            any = true;
            if let DecodeEvent::Frame(f) = &ev {
                check_frame(f);
                if f.kind == FrameKind::Control && f.payload.len() <= MAX_CONTROL {
                    if let Ok(m) = serde_json::from_slice::<HostMsg>(&f.payload) {
                        if let (0, HostMsg::Hello { nonce, .. }) = (f.stream, &m) {
                            self.hellos.push(*nonce);
                        }
                    }
                }
            }
            self.seen.push(Seen::from(&ev));
        }
        any
    }

    /// `server::serve` after a read of `data` (n > 0).
    fn read(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.dec.push(data);
        let progressed = self.drain();
        if !self.dec.is_mid_frame() {
            self.frame_started = None;
        } else if progressed || self.frame_started.is_none() {
            self.frame_started = Some(self.now);
        } else {
            self.try_expire();
        }
    }

    /// `server::try_expire`.
    fn try_expire(&mut self) {
        let Some(t) = self.frame_started else { return };
        if self.now - t < FRAME_DEADLINE_MS
            || !(self.dec.is_skipping() || self.dec.partial_has_sync())
        {
            return;
        }
        if self.dec.expire_partial() {
            self.disturbed = true;
            self.drain();
        }
        self.frame_started = self.dec.is_mid_frame().then_some(self.now);
    }

    /// Time passes with nothing to read: `poll` times out whenever a frame is pending.
    fn tick(&mut self, ms: u64) {
        let target = self.now + ms;
        loop {
            let Some(t) = self.frame_started else { break };
            let elapsed = self.now - t;
            let timeout = FRAME_DEADLINE_MS.checked_sub(elapsed).unwrap_or(1000).max(1);
            if self.now + timeout > target {
                break;
            }
            self.now += timeout;
            self.try_expire();
        }
        self.now = target;
    }

    /// `read()` returned 0 on the port: the host hung up.
    fn hup(&mut self) {
        if !self.dec.is_hunting() {
            self.disturbed = true;
            self.dec.reset();
            self.frame_started = None;
        }
    }
}

fn check_frame(f: &Frame) {
    assert!(f.payload.len() <= MAX_FRAME, "payload over MAX_FRAME");
    // Re-encoding a decoded frame gives bytes that decode to the same frame.
    let mut d = Decoder::new(MAX_FRAME);
    d.push(&f.encode());
    let again = d.next_event().expect("a re-encoded frame decodes");
    assert_eq!(Seen::from(&again), Seen::from(&DecodeEvent::Frame(f.clone())));
    assert_eq!(d.next_event(), None);
    assert!(!d.is_mid_frame());
    if f.kind == FrameKind::Control && f.payload.len() <= MAX_CONTROL {
        if let Ok(m) = serde_json::from_slice::<HostMsg>(&f.payload) {
            let again = serde_json::to_vec(&m).expect("serialise HostMsg");
            let back: HostMsg = serde_json::from_slice(&again).expect("HostMsg round trip");
            assert_eq!(back, m);
        }
        if let Ok(m) = serde_json::from_slice::<AgentMsg>(&f.payload) {
            let _ = m.is_final();
            if let AgentMsg::Error(e) = &m {
                let _ = e.code.to_string();
            }
            let again = serde_json::to_vec(&m).expect("serialise AgentMsg");
            let back: AgentMsg = serde_json::from_slice(&again).expect("AgentMsg round trip");
            assert_eq!(back, m);
        }
    }
}

fn hello_bytes(nonce: u64) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.extend_from_slice(&SYNC);
    let json = serde_json::to_vec(&HostMsg::Hello {
        nonce,
        protocol: PROTOCOL_VERSION,
    })
    .expect("hello json");
    Frame::control(0, json).encode_into(&mut b);
    b.to_vec()
}

fuzz_target!(|data: &[u8]| {
    let Ok(script) = Script::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let mut agent = Agent::new();
    let mut stream: Vec<u8> = Vec::new();
    let mut total = 0usize;
    for op in &script.ops {
        let mut chunks: Vec<Vec<u8>> = Vec::new();
        match op {
            Op::Bytes(b) => chunks.push(b.clone()),
            Op::Frame {
                kind,
                channel,
                stream,
                payload,
                split,
            } => {
                let raw_kind = *kind;
                let kind = match raw_kind % 4 {
                    0 => FrameKind::Control,
                    1 => FrameKind::Data,
                    2 => FrameKind::Eof,
                    _ => FrameKind::Control,
                };
                let mut b = BytesMut::new();
                Frame {
                    kind,
                    channel: *channel,
                    stream: u32::from(*stream),
                    payload: payload_bytes(payload).into(),
                }
                .encode_into(&mut b);
                if raw_kind % 4 == 3 {
                    b[2] = 9; // a kind that does not exist
                }
                if *split == 0 {
                    chunks.push(b.to_vec());
                } else {
                    // At most 256 pieces: tiny pieces of a 1 MiB frame only cost time.
                    let piece = usize::from(*split).max(b.len() / 256).max(1);
                    chunks.extend(b.chunks(piece).map(<[u8]>::to_vec));
                }
            }
            Op::Header { stream, len, give } => {
                let mut b = vec![0xA7, 1, 2, 0];
                b.extend_from_slice(&u32::from(*stream).to_be_bytes());
                b.extend_from_slice(&len.to_be_bytes());
                let give = (*len as usize).min(usize::from(*give));
                b.extend(std::iter::repeat_n(b'z', give));
                chunks.push(b);
            }
            Op::Sync => chunks.push(SYNC.to_vec()),
            Op::PartialSync(n) => chunks.push(SYNC[..usize::from(*n) % SYNC.len()].to_vec()),
            Op::Tick(ms) => agent.tick(u64::from(*ms) * 4),
            Op::Hup => agent.hup(),
        }
        for c in chunks {
            total += c.len();
            if total > 4 << 20 {
                return;
            }
            stream.extend_from_slice(&c);
            agent.read(&c);
        }
    }

    // Split invariance: the same bytes pushed at once give the same events.
    if !agent.disturbed {
        let mut whole = Decoder::new_hunting(MAX_FRAME);
        whole.push(&stream);
        let mut events = Vec::new();
        while let Some(ev) = whole.next_event() {
            events.push(Seen::from(&ev));
        }
        assert_eq!(
            events.len(),
            agent.seen.len(),
            "event count depends on how the bytes were split"
        );
        assert!(events == agent.seen, "events depend on how the bytes were split");
    }

    // A fresh host arrives and does what `client::handshake` does.
    if script.hup_before_host {
        agent.hup();
    }
    let hello = hello_bytes(script.nonce);
    let before = agent.hellos.len();
    for _ in 0..MAX_RESENDS {
        agent.read(&hello);
        if agent.hellos[before..].contains(&script.nonce) {
            return;
        }
        agent.tick(RESEND_MS);
        if agent.hellos[before..].contains(&script.nonce) {
            return;
        }
    }
    panic!(
        "agent wedged: a fresh host's hello did not get through in {MAX_RESENDS} resends \
         (mid_frame={}, skipping={}, hunting={})\nscript: {script:?}",
        agent.dec.is_mid_frame(),
        agent.dec.is_skipping(),
        agent.dec.is_hunting()
    );
});
