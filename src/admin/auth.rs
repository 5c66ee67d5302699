//! Who may use the admin API. With `SLUICE_ADMIN_TOKEN` set, every `/admin/*` route needs
//! `Authorization: Bearer <token>` (compared in constant time). Without it, read-only routes
//! answer loopback clients only and every change is refused with how to enable changes.

use std::net::SocketAddr;

use http::header::AUTHORIZATION;
use http::HeaderMap;
use subtle::ConstantTimeEq;

use super::ApiError;

/// The admin API's access rule.
#[derive(Clone)]
pub struct Access {
    token: Option<String>,
}

impl Access {
    /// Access with `token` (`None`: loopback read-only).
    pub fn new(token: Option<String>) -> Self {
        Self {
            token: token.filter(|t| !t.is_empty()),
        }
    }

    /// Allow or refuse a request from `peer` with `headers`; `mutating` for changes.
    pub fn check(
        &self,
        peer: SocketAddr,
        headers: &HeaderMap,
        mutating: bool,
    ) -> Result<(), ApiError> {
        match &self.token {
            Some(token) => {
                let given = headers
                    .get(AUTHORIZATION)
                    .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
                    .unwrap_or_default();
                if bool::from(given.ct_eq(token.as_bytes())) {
                    Ok(())
                } else {
                    Err(ApiError::unauthorized())
                }
            }
            None if mutating => Err(ApiError::forbidden(
                "changes are disabled: start sluice with SLUICE_ADMIN_TOKEN set and send \
                 `Authorization: Bearer <token>`",
            )),
            // `to_canonical`: on a dual-stack `[::]` listener, IPv4 loopback is ::ffff:127.0.0.1.
            None if !peer.ip().to_canonical().is_loopback() => Err(ApiError::forbidden(
                "without SLUICE_ADMIN_TOKEN the admin API answers loopback clients only",
            )),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(auth) = auth {
            headers.insert(AUTHORIZATION, auth.parse().unwrap());
        }
        headers
    }

    #[test]
    fn without_a_token_only_loopback_reads() {
        let access = Access::new(None);
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let local6: SocketAddr = "[::1]:5000".parse().unwrap();
        let remote: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        assert!(access.check(local, &headers(None), false).is_ok());
        assert!(access.check(local6, &headers(None), false).is_ok());
        assert_eq!(
            access
                .check(remote, &headers(None), false)
                .unwrap_err()
                .status,
            403
        );
        assert_eq!(
            access
                .check(local, &headers(None), true)
                .unwrap_err()
                .status,
            403
        );
    }

    #[test]
    fn with_a_token_everyone_needs_it() {
        let access = Access::new(Some("s3cret".into()));
        let remote: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        assert!(access
            .check(remote, &headers(Some("Bearer s3cret")), true)
            .is_ok());
        for wrong in [
            None,
            Some("Bearer s3cre"),
            Some("Bearer s3cret2"),
            Some("s3cret"),
            Some("Basic s3cret"),
        ] {
            assert_eq!(
                access
                    .check(remote, &headers(wrong), false)
                    .unwrap_err()
                    .status,
                401
            );
        }
        // An empty token is no token.
        assert_eq!(
            Access::new(Some(String::new()))
                .check(remote, &headers(None), false)
                .unwrap_err()
                .status,
            403
        );
    }
}
