//! Every decoder of guest- or VMM-supplied bytes, on arbitrary input: none may panic, and what
//! decodes must encode back to the same request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_user_iommu::protocol::{Config, FaultEvent, Request, decode_probe_properties};
use vhost_user_iommu::viot::Viot;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = Request::decode(data) {
        let (bytes, n) = req.encode();
        assert_eq!(Request::decode(&bytes[..n]), Ok(req));
        // Every meaningful byte round-trips; the head's reserved bytes and the reserved tails of
        // DETACH and PROBE are ignored by the spec, so they are not carried.
        let meaningful = match req {
            Request::Detach { .. } => 4 + 8,
            Request::Probe { .. } => 4 + 4,
            _ => n,
        };
        assert_eq!(bytes[4..meaningful], data[4..meaningful]);
    }
    let _ = decode_probe_properties(data);
    let _ = Config::from_bytes(data);
    let _ = FaultEvent::from_bytes(data);
    if let Ok(v) = Viot::parse(data) {
        let again = v.to_bytes().expect("a parsed table encodes");
        assert_eq!(Viot::parse(&again).as_ref(), Ok(&v));
    }
});
