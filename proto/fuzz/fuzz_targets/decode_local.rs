//! Feeds arbitrary bytes to the proxy-internal decoders (the local link
//! between pon-forwarder, pon-monitor and pon-router, and the router → TA
//! steering message); whatever decodes must re-encode to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pon_proto::local::LocalMsg;
use pon_proto::steering::Steering;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = LocalMsg::decode(data) {
        if let Ok(b) = m.encode() {
            assert_eq!(LocalMsg::decode(&b).unwrap(), m);
        }
    }
    if let Ok(m) = Steering::decode(data) {
        if let Ok(b) = m.encode() {
            assert_eq!(Steering::decode(&b).unwrap(), m);
        }
    }
});
