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
            None if !peer.ip().is_loopback() => Err(ApiError::forbidden(
                "without SLUICE_ADMIN_TOKEN the admin API answers loopback clients only",
            )),
            None => Ok(()),
        }
    }
}
