//! Arbitrary bytes, fed to the frame decoder in arbitrary pieces, never panic, never make
//! it buffer a frame beyond its maximum, and every frame decoded re-encodes to the same
//! bytes.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sharefs_protocol::{ClientMessage, FrameCodec, ServerMessage};
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let max = 4096;
    let mut codec = FrameCodec::new(max);
    let mut buf = BytesMut::new();
    let step = (split as usize % 64) + 1;
    for piece in rest.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(frame.header.len() + frame.payload.len() + 4 <= max as usize);
                    let _ = frame.message::<ClientMessage>();
                    let _ = frame.message::<ServerMessage>();
                    let mut out = BytesMut::new();
                    FrameCodec::new(max).encode(frame.clone(), &mut out).expect("re-encode");
                    let again = FrameCodec::new(max).decode(&mut out).expect("decode").expect("frame");
                    assert_eq!(again, frame);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = codec.decode_eof(&mut buf);
});
