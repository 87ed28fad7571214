//! Every peer message decoder of `shoal_protocol` (have requests and answers with their
//! bitfields and member lists, layer requests and full or partial layers, piece requests and
//! answers, acknowledgements): the first byte picks the decoder, the rest is the body. A body
//! decodes or is refused with an error, never a panic; what decodes encodes to a body that
//! decodes to the same message.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use shoal_protocol::{
    Ack, HaveRequest, HaveResponse, LayerRequest, LayerResponse, Message, PieceRequest,
    PieceResponse,
};

fn round_trip<M: Message + PartialEq + std::fmt::Debug>(body: &[u8]) {
    let Ok(m) = M::decode(Bytes::copy_from_slice(body)) else {
        return;
    };
    let (head, bulk) = m.encode_parts();
    let again = [head.as_slice(), bulk.as_ref()].concat();
    assert!(again.len() <= M::MAX_LEN_BYTES, "re-encoded over the limit");
    let m2 = M::decode(Bytes::from(again)).expect("a decoded message encodes to a valid body");
    assert_eq!(m, m2);
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 7 {
        0 => round_trip::<HaveRequest>(body),
        1 => round_trip::<HaveResponse>(body),
        2 => round_trip::<LayerRequest>(body),
        3 => round_trip::<LayerResponse>(body),
        4 => round_trip::<PieceRequest>(body),
        5 => round_trip::<PieceResponse>(body),
        _ => round_trip::<Ack>(body),
    }
});
