//! Feeds arbitrary bytes to the peer frame decoder.
//!
//! Properties checked: decoding never panics; a per-frame error consumes at least one byte
//! (so the loop always progresses); every frame that decodes re-encodes and decodes back
//! to itself.
//!
//! Random bytes almost never carry valid CRCs, so half of the inputs (first byte odd) are
//! instead wrapped into a frame with a correct header and body CRC (`kind`, `flags`, id and
//! body taken from the input), which sends them straight into the body parsers.
#![no_main]

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use peersan::peer::proto::{FRAME_MAGIC, PeerCodec, encode_frame};
use tokio_util::codec::Decoder;

/// Header with valid CRCs around `body` (layout in PROTOCOL.md).
fn wrap(kind: u8, flags: u8, id: u64, body: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_slice(&FRAME_MAGIC);
    b.put_u32_le(body.len() as u32);
    b.put_u8(kind);
    b.put_u8(flags);
    b.put_u16_le(0);
    b.put_u64_le(id);
    b.put_u32_le(crc32c::crc32c(body));
    b.put_u32_le(0);
    let hc = crc32c::crc32c(&b[..28]);
    b.put_u32_le(hc);
    b.put_slice(body);
    b.to_vec()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let wrapped;
    let data = if mode & 1 == 1 {
        let [kind, flags, rest @ ..] = data else {
            return;
        };
        wrapped = wrap(*kind, *flags & (mode >> 1 & 1), 42, rest);
        &wrapped[..]
    } else {
        data
    };
    // The rest of the mode byte picks how the stream is chunked, to exercise partial reads.
    let chunk = usize::from(mode >> 2).max(1) * 16;
    let mut codec = PeerCodec;
    let mut buf = BytesMut::new();
    let mut fed = 0;
    loop {
        let before = buf.len();
        match codec.decode(&mut buf) {
            Ok(Some(frame)) => {
                let mut again = BytesMut::new();
                encode_frame(&frame, &mut again).expect("a decoded frame must re-encode");
                let back = codec
                    .decode(&mut again)
                    .expect("a re-encoded frame must decode")
                    .expect("a re-encoded frame is complete");
                assert_eq!(back, frame);
                assert!(again.is_empty());
            }
            Ok(None) => {
                if fed == data.len() {
                    let _ = codec.decode_eof(&mut buf);
                    return;
                }
                let n = chunk.min(data.len() - fed);
                buf.extend_from_slice(&data[fed..fed + n]);
                fed += n;
            }
            Err(e) if e.is_fatal() => return,
            Err(_) => assert!(buf.len() < before, "per-frame error must consume the frame"),
        }
    }
});
