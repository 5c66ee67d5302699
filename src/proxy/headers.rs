//! Header hygiene between client and endpoint (RFC 9110 §7.6.1): hop-by-hop headers are
//! removed both ways, forwarding headers are added, every end-to-end header passes unchanged.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{request, response, Version};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Hop-by-hop headers: meaningful for one connection only, never forwarded.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// The position of `name` (lower case) in [`HOP_BY_HOP`]. A match on the name: every header
/// of every request and response goes through it, and it compiles to a length switch and at
/// most one comparison.
fn hop_by_hop_index(name: &str) -> Option<usize> {
    Some(match name {
        "connection" => 0,
        "proxy-authenticate" => 1,
        "proxy-authorization" => 2,
        "te" => 3,
        "trailer" => 4,
        "transfer-encoding" => 5,
        "upgrade" => 6,
        "keep-alive" => 7,
        "proxy-connection" => 8,
        _ => return None,
    })
}

/// Remove hop-by-hop headers, including every header named in `Connection`.
///
/// Most endpoints answer with `Connection: keep-alive` (nginx, gunicorn, uvicorn...), so the
/// path that strips something is the usual one for responses: it allocates nothing unless
/// `Connection` names an end-to-end header.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names, without hashing: which hop-by-hop headers are here.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name.as_str()) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // Names listed in `Connection` that are not hop-by-hop anyway (nor the `close` option).
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|token| !token.eq_ignore_ascii_case(b"close") && !is_hop_by_hop_token(token))
        .filter_map(|token| HeaderName::from_bytes(token).ok())
        .collect();
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    for name in named {
        headers.remove(name);
    }
}

/// A `Connection` token (any case) that names a hop-by-hop header.
fn is_hop_by_hop_token(token: &[u8]) -> bool {
    let mut lower = [0u8; 24];
    let Some(lower) = lower.get_mut(..token.len()) else {
        return false;
    };
    for (l, t) in lower.iter_mut().zip(token) {
        *l = t.to_ascii_lowercase();
    }
    std::str::from_utf8(lower).is_ok_and(|name| hop_by_hop_index(name).is_some())
}

/// The client address as an `X-Forwarded-For` element.
fn ip_value(ip: IpAddr) -> HeaderValue {
    match ip {
        // Dotted quads by hand: this runs on every request, and `Display` is slow.
        IpAddr::V4(v4) => {
            let mut text = [0u8; 15];
            let mut len = 0;
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text[len] = b'.';
                    len += 1;
                }
                let octet = digits.format(octet).as_bytes();
                text[len..len + octet.len()].copy_from_slice(octet);
                len += octet.len();
            }
            HeaderValue::from_bytes(&text[..len]).expect("digits and dots")
        }
        IpAddr::V6(v6) => HeaderValue::from_str(&v6.to_string()).expect("hex digits and colons"),
    }
}

fn via_value(version: Version) -> HeaderValue {
    HeaderValue::from_static(match version {
        Version::HTTP_09 => "0.9 sluice",
        Version::HTTP_10 => "1.0 sluice",
        Version::HTTP_2 => "2 sluice",
        Version::HTTP_3 => "3 sluice",
        _ => "1.1 sluice",
    })
}

/// Prepare a client request's head for the endpoints: strip hop-by-hop headers, append
/// `X-Forwarded-For`, set `X-Forwarded-Proto`/`-Host`, append `Via`. Method, path, query and
/// end-to-end headers stay as they are; `Host` is set per endpoint when the request is sent.
pub fn to_upstream(parts: &mut request::Parts, client_ip: IpAddr) {
    let original_host = super::inbound::forwarded_host(parts);
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);

    // Several X-Forwarded-For lines are one list (RFC 9110 §5.3): join them and append.
    let client = ip_value(client_ip);
    if headers.contains_key(&X_FORWARDED_FOR) {
        let mut list = Vec::new();
        for earlier in headers.get_all(&X_FORWARDED_FOR) {
            list.extend_from_slice(earlier.as_bytes());
            list.extend_from_slice(b", ");
        }
        list.extend_from_slice(client.as_bytes());
        if let Ok(value) = HeaderValue::from_bytes(&list) {
            headers.insert(X_FORWARDED_FOR.clone(), value);
        }
    } else {
        headers.insert(X_FORWARDED_FOR.clone(), client);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    match original_host {
        Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host),
        None => headers.remove(&X_FORWARDED_HOST),
    };
    headers.append(header::VIA, via_value(parts.version));
}

/// Prepare an endpoint's response head for the client: strip hop-by-hop headers, append `Via`
/// (naming the endpoint's version), and answer in sluice's own version (RFC 9110 §6.2): an
/// HTTP/1.0 status line relayed to an HTTP/1.1 client would end its keep-alive connection,
/// and with it any request pipelined behind. hyper answers an HTTP/1.0 client in 1.0 itself.
pub fn to_client(parts: &mut response::Parts) {
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.append(header::VIA, via_value(parts.version));
    parts.version = Version::HTTP_11;
}

/// Whether an endpoint's response head frames its body in a way sluice must not relay: both
/// `Content-Length` and `Transfer-Encoding` (a response-splitting shape, RFC 9112 §6.3), or a
/// transfer coding other than `chunked` alone, which sluice could neither decode nor pass on
/// (it re-frames every body). nginx and Envoy answer such a response 502; so does sluice.
pub fn has_ambiguous_framing(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        && (headers.contains_key(header::CONTENT_LENGTH) || !is_chunked_alone(headers))
}

/// Whether the `Transfer-Encoding` lines together list exactly one coding, `chunked`: the only
/// transfer coding sluice implements, in either direction.
pub fn is_chunked_alone(headers: &HeaderMap) -> bool {
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|coding| !coding.is_empty());
    matches!(
        (codings.next(), codings.next()),
        (Some(coding), None) if coding.eq_ignore_ascii_case(b"chunked")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    #[test]
    fn client_addresses() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.200.3.255",
            "255.255.255.255",
            "::1",
            "fe80::1:2",
        ] {
            assert_eq!(ip_value(ip.parse().unwrap()), ip);
        }
    }

    #[test]
    fn responses_without_hop_by_hop_headers_are_untouched() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert("x-model", HeaderValue::from_static("v3"));
        let before = headers.clone();
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers, before);
        headers.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-model"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.keys().collect::<Vec<_>>(), ["content-type"]);
    }

    #[test]
    fn the_name_match_and_the_list_agree() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name.as_str()), Some(i), "{name}");
        }
        assert_eq!(hop_by_hop_index("content-type"), None);
    }

    #[test]
    fn connection_tokens_are_matched_in_any_case() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.append("connection", HeaderValue::from_static("Keep-Alive, X-Hop"));
        headers.append("connection", HeaderValue::from_static("close,TE"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.keys().collect::<Vec<_>>(), ["content-type"]);
        assert!(is_hop_by_hop_token(b"Proxy-Connection"));
        assert!(!is_hop_by_hop_token(
            b"x-a-rather-long-header-name-of-no-importance"
        ));
    }

    #[test]
    fn request_hygiene() {
        let req = Request::builder()
            .uri("/score?x=1")
            .header("host", "api.example")
            .header("connection", "keep-alive, x-secret-hop")
            .header("x-secret-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("x-forwarded-for", "10.0.0.1")
            .header("x-forwarded-for", "10.0.0.2")
            .header("x-end-to-end", "Kept  As-Is")
            .body(())
            .unwrap();
        let (mut parts, ()) = req.into_parts();
        to_upstream(&mut parts, "127.0.0.9".parse().unwrap());
        let h = &parts.headers;
        assert!(h.get("connection").is_none());
        assert!(h.get("x-secret-hop").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("te").is_none());
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 127.0.0.9");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-host"], "api.example");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["via"], "1.1 sluice");
        assert_eq!(h["x-end-to-end"], "Kept  As-Is");
        assert_eq!(parts.uri, "/score?x=1");
    }
}
