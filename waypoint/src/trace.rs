//! A request's identifiers as Envoy hands them on: `x-request-id` (kept when
//! the client sent one) and W3C trace context (`traceparent`, continued
//! with a new span, or a new trace).

use http::HeaderMap;

/// A fresh `x-request-id`: 128 random bits in UUID form, as Envoy makes one.
pub(crate) fn request_id() -> String {
    let r: u128 = rand::random();
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        r >> 96,
        (r >> 80) & 0xffff,
        (r >> 64) & 0xffff,
        (r >> 48) & 0xffff,
        r & 0xffff_ffff_ffff
    )
}

/// The `traceparent` to send on: the client's trace continued with a new
/// span of ours, or a new sampled trace when it sent none that is valid.
pub(crate) fn traceparent(h: &HeaderMap) -> String {
    let span: u64 = rand::random::<u64>() | 1;
    let parent = h
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(parent);
    match parent {
        Some((trace, flags)) => format!("00-{trace}-{span:016x}-{flags}"),
        None => format!("00-{:032x}-{span:016x}-01", rand::random::<u128>() | 1),
    }
}

/// The trace id and flags of a version-00 `traceparent`
/// (`00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, lowercase,
/// neither id all zeros); None for anything else, so a malformed one starts
/// a new trace instead of being passed on.
fn parent(v: &str) -> Option<(&str, &str)> {
    let hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
    };
    let id = |s: &str, len: usize| hex(s, len) && s.bytes().any(|c| c != b'0');
    let mut p = v.split('-');
    let (version, trace, span, flags) = (p.next()?, p.next()?, p.next()?, p.next()?);
    (p.next().is_none() && version == "00" && id(trace, 32) && id(span, 16) && hex(flags, 2))
        .then_some((trace, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    #[test]
    fn which_traceparents_are_continued() {
        let ok = format!("00-{TRACE}-00f067aa0ba902b7-01");
        let cases: &[(String, Option<(&str, &str)>)] = &[
            (ok.clone(), Some((TRACE, "01"))),
            (
                format!("00-{TRACE}-00f067aa0ba902b7-00"),
                Some((TRACE, "00")),
            ),
            // Wrong shape, case, version or an all-zero id: a new trace.
            (format!("00-{TRACE}-00f067aa0ba902b7"), None),
            (format!("{ok}-extra"), None),
            (ok.to_uppercase(), None),
            (format!("01-{TRACE}-00f067aa0ba902b7-01"), None),
            (format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32)), None),
            (format!("00-{TRACE}-0000000000000000-01"), None),
            (format!("00-{TRACE}-00f067aa0ba902b7-1"), None),
            (format!("00-{}-00f067aa0ba902b7-01", &TRACE[1..]), None),
            (String::new(), None),
        ];
        for (v, want) in cases {
            assert_eq!(parent(v), *want, "{v:?}");
        }
    }

    #[test]
    fn a_continued_trace_keeps_its_id_and_flags_with_a_new_span() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            format!("00-{TRACE}-00f067aa0ba902b7-00").parse().unwrap(),
        );
        let tp = traceparent(&h);
        let (trace, flags) = parent(&tp).expect("ours is valid");
        assert_eq!((trace, flags), (TRACE, "00"));
        assert!(!tp.contains("00f067aa0ba902b7"), "{tp}: a new span");
        // None sent: a new, valid, sampled trace.
        let fresh = traceparent(&HeaderMap::new());
        assert_eq!(parent(&fresh).map(|(_, f)| f), Some("01"), "{fresh}");
    }

    #[test]
    fn request_ids_are_uuid_shaped_and_differ() {
        let (a, b) = (request_id(), request_id());
        assert_ne!(a, b);
        let groups: Vec<usize> = a.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{a}");
        assert!(a.bytes().all(|c| c == b'-' || c.is_ascii_hexdigit()));
    }
}
