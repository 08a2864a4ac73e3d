//! The Unix-socket authority layer alone (`kms_plugin::server::authority::Rewriter`), in
//! this process: the bytes of many gRPC requests, as grpc-go writes them (HPACK with its
//! dynamic table, a HEADERS and a DATA frame each), fed through it in 16 KiB reads.
//!
//! Two streams: `:authority: localhost` (what newer apiservers and tonic send: every block
//! is decoded and passed byte for byte) and the socket path (what older apiservers send:
//! every block is decoded and re-encoded).

use std::time::Instant;

use kms_plugin::server::authority::Rewriter;

const REQUESTS: usize = 20_000;
const RUNS: usize = 7;

#[derive(Debug, Clone, Copy)]
pub struct LayerCost {
    pub requests: usize,
    /// Median CPU time per request through the layer, in ns.
    pub pass_ns: f64,
    pub rewrite_ns: f64,
    /// Bytes per request in, and out of the rewriting layer.
    pub bytes_in: f64,
    pub bytes_out_rewrite: f64,
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// A connection's worth of Encrypt requests with this authority.
fn stream(authority: &str) -> Vec<u8> {
    let mut enc = loona_hpack::Encoder::new();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(0x4, 0, 0, &[], &mut out);
    // A 32-byte seed and a 36-byte uid in a gRPC message.
    let mut data = vec![0, 0, 0, 0, 72, 0x0a, 32];
    data.extend_from_slice(&[7; 32]);
    data.extend_from_slice(&[0x12, 36]);
    data.extend_from_slice(b"0f0e0d0c-0b0a-0908-0706-050403020100");
    for i in 0..REQUESTS {
        let stream = 1 + 2 * i as u32;
        let timeout = format!("{}m", 2999 - i % 7);
        let headers: [(&[u8], &[u8]); 8] = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/v2.KeyManagementService/Encrypt"),
            (b":authority", authority.as_bytes()),
            (b"content-type", b"application/grpc"),
            (b"user-agent", b"grpc-go/1.33.3"),
            (b"te", b"trailers"),
            (b"grpc-timeout", timeout.as_bytes()),
        ];
        let block = enc.encode(headers);
        frame(0x1, 0x4, stream, &block, &mut out);
        frame(0x0, 0x1, stream, &data, &mut out);
    }
    out
}

/// (median ns per request, bytes out) of feeding `input` through a fresh layer.
fn time(input: &[u8]) -> (f64, usize) {
    let mut samples = Vec::with_capacity(RUNS);
    let mut bytes_out = 0;
    for _ in 0..RUNS {
        let mut r = Rewriter::new();
        let mut out = 0;
        let t = Instant::now();
        for chunk in input.chunks(16 * 1024) {
            if r.feed(chunk).is_err() {
                return (f64::NAN, 0);
            }
            out += r.output().split().len();
        }
        samples.push(t.elapsed().as_nanos() as f64 / REQUESTS as f64);
        bytes_out = out;
    }
    (crate::stats::median(&samples), bytes_out)
}

pub fn measure() -> LayerCost {
    let pass = stream("localhost");
    let rewrite = stream("/var/run/edgeseal/kms.sock");
    let (pass_ns, _) = time(&pass);
    let (rewrite_ns, out) = time(&rewrite);
    LayerCost {
        requests: REQUESTS,
        pass_ns,
        rewrite_ns,
        bytes_in: rewrite.len() as f64 / REQUESTS as f64,
        bytes_out_rewrite: out as f64 / REQUESTS as f64,
    }
}
