//! Feeds arbitrary bytes to the CU control-message framing and decoders;
//! whatever decodes must re-encode and decode to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pon_proto::control::{self, AgentMsg, CuMsg, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    let mut d = FrameDecoder::new(control::MAX_AGENT_FRAME);
    // Split the input at a data-chosen point to exercise partial reads.
    let cut = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    if d.push(&data[..cut]).is_ok() && d.push(&data[cut..]).is_ok() {
        while let Ok(Some(body)) = d.next_frame() {
            if let Ok(m) = control::decode::<AgentMsg>(&body) {
                let f = control::encode(&m);
                assert_eq!(control::decode::<AgentMsg>(&f[4..]).unwrap(), m);
            }
        }
    }
    if let Ok(m) = control::decode::<CuMsg>(data) {
        let f = control::encode(&m);
        assert_eq!(control::decode::<CuMsg>(&f[4..]).unwrap(), m);
    }
});
