//! What a client's request must be before it is routed, and the one form it is routed and
//! forwarded in: a valid `Host` (RFC 9112 §3.2), no transfer coding sluice does not implement
//! (RFC 9112 §6.1), and a path without dot-segments (RFC 3986 §5.2.4), so that the service a
//! request is routed to is the one whose endpoint serves it.

use std::borrow::Cow;

use http::header::{self, HeaderValue};
use http::{request, uri, Uri, Version};

use super::headers::is_chunked_alone;
use crate::reason::Reason;

/// Refuse a head that must never reach an endpoint, before routing.
///
/// - `Host`: an HTTP/1.1 request without one, any request with two, or one whose value is not
///   `host[:port]` gets 400 (RFC 9112 §3.2: a server MUST). It would otherwise reach the
///   endpoint as `X-Forwarded-Host`, a header many frameworks trust to build links.
/// - `Transfer-Encoding`: anything but `chunked` alone gets 501 (RFC 9112 §6.1; what nginx
///   answers). hyper accepts a list that ends with `chunked` and decodes only that coding, so
///   `gzip, chunked` would reach the endpoint relabelled `chunked` with gzip bytes as its body.
///   HTTP/2 has no transfer codings (h2 refuses the header itself).
pub fn check(head: &request::Parts) -> Result<(), Reason> {
    let mut hosts = head.headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err(Reason::InvalidHost),
        (Some(host), None) if !is_valid_host(host.as_bytes()) => return Err(Reason::InvalidHost),
        // HTTP/2 carries the host in `:authority` (the URI); HTTP/1.0 may omit it.
        (None, _) if head.version == Version::HTTP_11 => return Err(Reason::InvalidHost),
        _ => {}
    }
    if head.headers.contains_key(header::TRANSFER_ENCODING) && !is_chunked_alone(&head.headers) {
        return Err(Reason::UnsupportedTransferCoding);
    }
    Ok(())
}

/// `X-Forwarded-Host`: the authority of an absolute-form target or of HTTP/2's `:authority`
/// (which take the place of `Host`, RFC 9112 §3.2.2), else the `Host` [`check`] accepted.
pub fn forwarded_host(head: &request::Parts) -> Option<HeaderValue> {
    match head.uri.authority() {
        Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
        None => head.headers.get(header::HOST).cloned(),
    }
}

/// `uri-host [ ":" port ]` (RFC 9112 §3.2, RFC 3986 §3.2.2), with a host that is not empty:
/// an IP literal in brackets, or a reg-name (which covers IPv4 addresses and DNS names).
/// No userinfo, no path, no spaces.
fn is_valid_host(value: &[u8]) -> bool {
    let (host, port) = if value.first() == Some(&b'[') {
        let Some(close) = value.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &value[1..close];
        let valid_literal = !literal.is_empty()
            && literal
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b":.-_~!$&'()*+,;=".contains(&b));
        if !valid_literal {
            return false;
        }
        (&value[..=close], &value[close + 1..])
    } else {
        match value.iter().rposition(|&b| b == b':') {
            Some(colon) => (&value[..colon], &value[colon..]),
            None => (value, &value[value.len()..]),
        }
    };
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    port_ok && !host.is_empty() && (host[0] == b'[' || is_reg_name(host))
}

/// `reg-name = *( unreserved / pct-encoded / sub-delims )` (RFC 3986 §3.2.2).
fn is_reg_name(name: &[u8]) -> bool {
    let mut i = 0;
    while i < name.len() {
        let b = name[i];
        if b == b'%' {
            let hex = name.get(i + 1..i + 3);
            if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                return false;
            }
            i += 3;
            continue;
        }
        if !(b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b)) {
            return false;
        }
        i += 1;
    }
    true
}

/// The target with dot-segments removed from its path (RFC 3986 §5.2.4), or `None` when it
/// has none (nearly always: then nothing is copied). A segment `.` or `..` also counts when
/// its dots are percent-encoded (`%2e`, RFC 3986 §6.2.2.2), since an endpoint that decodes
/// them would resolve it. nginx and Envoy (`normalize_path`) route on the normalised path and
/// forward it; so does sluice: `/raw/../score` is routed and forwarded as `/score`, and never
/// reaches the endpoint behind `/raw` as a request for `/score`.
pub fn normalized(target: &Uri) -> Option<Uri> {
    let path = remove_dot_segments(target.path())?;
    let path_and_query = match target.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.into_owned(),
    };
    let mut parts = uri::Parts::from(target.clone());
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    Uri::from_parts(parts).ok()
}

/// `path` without its dot-segments, or `None` when it has none.
fn remove_dot_segments(path: &str) -> Option<Cow<'_, str>> {
    // A dot-segment starts right after a slash, with a dot or a percent sign.
    if !path.starts_with('/') || !(path.contains("/.") || path.contains("/%")) {
        return None;
    }
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    if !segments.iter().any(|s| dots(s).is_some()) {
        return None;
    }
    let mut kept: Vec<&str> = Vec::with_capacity(segments.len());
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate() {
        match dots(segment) {
            None => kept.push(segment),
            Some(n) => {
                if n == 2 {
                    kept.pop();
                }
                // A path that ends in a dot-segment names a directory: `/a/b/..` is `/a/`.
                if i == last {
                    kept.push("");
                }
            }
        }
    }
    Some(Cow::Owned(format!("/{}", kept.join("/"))))
}

/// 1 for a `.` segment, 2 for `..` (either dot may be written `%2e` or `%2E`), else `None`.
fn dots(segment: &str) -> Option<usize> {
    let mut rest = segment.as_bytes();
    let mut n = 0;
    while !rest.is_empty() {
        rest = if rest[0] == b'.' {
            &rest[1..]
        } else if rest.len() >= 3 && rest[..3].eq_ignore_ascii_case(b"%2e") {
            &rest[3..]
        } else {
            return None;
        };
        n += 1;
    }
    (1..=2).contains(&n).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    #[test]
    fn hosts() {
        for valid in [
            "api.example",
            "api.example:8080",
            "127.0.0.1:9",
            "[::1]:8080",
            "[fe80::1]",
            "xn--bcher-kva.example",
            "a%41b",
            "host:",
        ] {
            assert!(is_valid_host(valid.as_bytes()), "{valid}");
        }
        for invalid in [
            "",
            "user@evil",
            "a/b?c",
            "a b",
            ":80",
            "[::1",
            "[]",
            "[::1]x",
            "host:8o",
            "a%4",
            "a\\b",
        ] {
            assert!(!is_valid_host(invalid.as_bytes()), "{invalid}");
        }
    }

    #[test]
    fn dot_segments() {
        for (path, expected) in [
            ("/raw/../score", Some("/score")),
            ("/raw/%2e%2E/score", Some("/score")),
            ("/raw/.%2e/score", Some("/score")),
            ("/a/./b", Some("/a/b")),
            ("/a/b/..", Some("/a/")),
            ("/a/b/.", Some("/a/b/")),
            ("/..", Some("/")),
            ("/../../x", Some("/x")),
            ("/a//../b", Some("/a/b")),
            ("/a/b", None),
            ("/a/.hidden/...", None),
            ("/a/%2e%2e%2e", None),
            ("/v1.2/score", None),
            ("*", None),
        ] {
            assert_eq!(remove_dot_segments(path).as_deref(), expected, "{path}");
        }
    }

    #[test]
    fn a_normalized_target_keeps_its_query_and_authority() {
        let uri: Uri = "http://api.example/raw/../score?x=1".parse().unwrap();
        assert_eq!(
            normalized(&uri).unwrap(),
            "http://api.example/score?x=1".parse::<Uri>().unwrap()
        );
        assert!(normalized(&"/score?x=/../".parse().unwrap()).is_none());
    }

    #[test]
    fn transfer_codings() {
        let list = |lines: &[&str]| {
            let mut headers = HeaderMap::new();
            for line in lines {
                headers.append(header::TRANSFER_ENCODING, line.parse().unwrap());
            }
            is_chunked_alone(&headers)
        };
        assert!(list(&["chunked"]));
        assert!(list(&["Chunked "]));
        assert!(!list(&["gzip, chunked"]));
        assert!(!list(&["chunked, chunked"]));
        assert!(!list(&["gzip", "chunked"]));
        assert!(!list(&[""]));
    }
}
