//! Header hygiene between client and endpoint (RFC 9110 §7.6.1): hop-by-hop headers are
//! removed both ways, forwarding headers are added, every end-to-end header passes unchanged.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{request, response, Version};

/// Hop-by-hop headers: meaningful for one connection only, never forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
];

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Remove hop-by-hop headers, including every header named in `Connection`.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Collect first: the names borrow from the Connection values we are about to remove.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(&PROXY_CONNECTION);
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
    let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
        // HTTP/2 carries the host in the :authority pseudo-header, i.e. the URI.
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);

    // Several X-Forwarded-For lines are one list (RFC 9110 §5.3): join them and append.
    let mut list = Vec::new();
    for earlier in headers.get_all(&X_FORWARDED_FOR) {
        list.extend_from_slice(earlier.as_bytes());
        list.extend_from_slice(b", ");
    }
    list.extend_from_slice(client_ip.to_string().as_bytes());
    if let Ok(value) = HeaderValue::from_bytes(&list) {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    match original_host {
        Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host),
        None => headers.remove(&X_FORWARDED_HOST),
    };
    headers.append(header::VIA, via_value(parts.version));
}

/// Prepare an endpoint's response head for the client: strip hop-by-hop headers, append `Via`.
pub fn to_client(parts: &mut response::Parts) {
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.append(header::VIA, via_value(parts.version));
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

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
