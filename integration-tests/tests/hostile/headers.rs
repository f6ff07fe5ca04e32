use proptest::prelude::*;

use crate::corpus::targets;

/// Byte strings shaped like each header, with the awkward parts mixed in.
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        any::<Vec<u8>>(),
        // grpc-timeout: digits of any length (u64::MAX and beyond) and a unit, known or not.
        ("[0-9]{0,30}", "[HMSmunx ]?").prop_map(|(d, u)| format!("{d}{u}").into_bytes()),
        // traceparent: the right layout with any characters in it.
        ("[0-9a-fA-Fz]{2}", "[0-9a-f]{32}", "[0-9a-fz]{16}", "[0-9a-f]{2}", "(-.{0,8})?")
            .prop_map(|(v, t, s, f, rest)| format!("{v}-{t}-{s}-{f}{rest}").into_bytes()),
        // authorization: a scheme in any case, spaces and tabs, any bytes after.
        ("(?i)bearer|basic|", "[ \t]{0,3}", any::<Vec<u8>>()).prop_map(|(s, sp, k)| {
            let mut b = format!("{s}{sp}").into_bytes();
            b.extend(k);
            b
        }),
    ]
}

proptest! {
    /// Hostile `grpc-timeout`, `traceparent` and `authorization` values: each parser answers
    /// without panicking and accepts only what its grammar allows (see `targets::headers`).
    #[test]
    fn hostile_header_values_are_judged_without_panicking(bytes in header_bytes()) {
        targets::headers(&bytes);
    }

    /// Every timeout the spec allows parses, up to 99,999,999 hours, without overflow.
    #[test]
    fn every_timeout_the_spec_allows_parses(n in 0..=99_999_999u64, unit in "[HMSmun]") {
        let text = format!("{n}{unit}");
        prop_assert!(dispatch::parse_grpc_timeout(text.as_bytes()).is_ok(), "{}", text);
    }
}
