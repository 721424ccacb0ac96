//! Feeds arbitrary bytes to the proxy-internal decoders (the local link
//! between pon-forwarder, pon-monitor and pon-router, and the router → TA
//! steering message); whatever decodes must re-encode to the same message.
//! The input is also read as a run of local datagrams (each behind a
//! one-byte length) whose PMon parts go to one forwarder's assembler:
//! whatever report it lets out must pass `Report::check`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pon_proto::local::{LocalMsg, PmonAssembler};
use pon_proto::steering::Steering;

fuzz_target!(|data: &[u8]| {
    // Compared as bytes: a bandwidth of NaN decodes to a message that is
    // not equal to itself.
    if let Ok(m) = LocalMsg::decode(data) {
        if let Ok(b) = m.encode() {
            assert_eq!(LocalMsg::decode(&b).unwrap().encode().unwrap(), b);
        }
    }
    if let Ok(m) = Steering::decode(data) {
        if let Ok(b) = m.encode() {
            assert_eq!(Steering::decode(&b).unwrap(), m);
        }
    }
    let mut pmon = PmonAssembler::default();
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let (datagram, after) = tail.split_at(usize::from(len).min(tail.len()));
        rest = after;
        if let Ok(LocalMsg::Pmon(part)) = LocalMsg::decode(datagram) {
            if let Ok(Some(r)) = pmon.push(part) {
                assert!(r.check().is_ok(), "an unchecked report came out: {r:?}");
            }
        }
    }
});
