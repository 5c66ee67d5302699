//! The Redis connection: one multiplexed connection that reconnects by itself, every call
//! bounded by `store.timeout`, and the store's health (up, or degraded since an error) kept
//! in atomics the request path reads without waiting.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, FromRedisValue, IntoConnectionInfo, Script, ScriptInvocation};
use tokio::time::Instant;

use crate::config::StoreConfig;

/// Env var with the Redis password, for deployments that keep it out of the config file.
pub const PASSWORD_ENV: &str = "SLUICE_REDIS_PASSWORD";

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL cannot be used.
    #[error("store.url: {0}")]
    Url(String),
    /// No answer within `store.timeout`.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error, or the connection is down.
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
    /// Redis answered something sluice did not write.
    #[error("unexpected data in the store: {0}")]
    Data(String),
    /// A write whose answer did not come, and whose outcome could not be read back: Redis
    /// may have applied it.
    #[error("{0}, and whether the store applied it could not be read back")]
    Unconfirmed(Box<StoreError>),
}

impl StoreError {
    /// Whether the call may have reached Redis and run although it failed here: its answer
    /// timed out or its connection broke while it was under way (a refused connection never
    /// carried it).
    pub fn may_have_been_applied(&self) -> bool {
        match self {
            Self::Timeout(_) => true,
            Self::Redis(e) => e.is_io_error() && !e.is_connection_refusal(),
            _ => false,
        }
    }
}

/// Counts for `/metrics`.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Calls made.
    pub calls: AtomicU64,
    /// Calls that failed or timed out.
    pub errors: AtomicU64,
    /// Requests decided by `on_error` because the store was unreachable.
    pub fallbacks: AtomicU64,
    /// Times the store went from up to unreachable: outage 0 is the time before the first
    /// answer, outage n the n-th loss after an answer.
    pub outages: AtomicU64,
}

/// The connection, the key prefix and the health.
pub struct Redis {
    connection: ConnectionManager,
    prefix: String,
    timeout: Duration,
    up: AtomicBool,
    /// Counts for `/metrics`.
    pub stats: StoreStats,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("prefix", &self.prefix)
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// A connection to `config.url` that is made lazily and remade after every failure, so
    /// sluice starts (with `on_error` in force) even while Redis is down.
    pub fn connect(config: &StoreConfig) -> Result<Self, StoreError> {
        let mut info = config
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| StoreError::Url(e.to_string()))?;
        if let Ok(password) = std::env::var(PASSWORD_ENV) {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info).map_err(|e| StoreError::Url(e.to_string()))?;
        // A reconnect must not hold anything up: calls fail fast while it is under way, and
        // it is retried on the next call.
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout.max(Duration::from_millis(250))))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_lazy_with_config(client, manager)?;
        Ok(Self {
            connection,
            prefix: config.key_prefix.clone(),
            timeout: config.timeout,
            up: AtomicBool::new(false),
            stats: StoreStats::default(),
        })
    }

    /// `prefix` + `name`.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Whether the last call succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// The per-call time limit.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Run a command within the time limit.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        let mut connection = self.connection.clone();
        self.bounded(async move { cmd.query_async(&mut connection).await })
            .await
    }

    /// Run a pipeline within the time limit.
    pub async fn pipeline<T: FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        let mut connection = self.connection.clone();
        self.bounded(async move { pipe.query_async(&mut connection).await })
            .await
    }

    /// Run a script (by its SHA1; loaded on first use and after a restart) within the limit.
    pub async fn invoke<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.invoke_by(invocation, Instant::now() + self.timeout)
            .await
    }

    /// Run a script, answered by `deadline` (a request's time limit, part of which it may
    /// have spent waiting for its turn).
    pub async fn invoke_by<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
        deadline: Instant,
    ) -> Result<T, StoreError> {
        let mut connection = self.connection.clone();
        self.bounded_by(
            async move { invocation.invoke_async(&mut connection).await },
            deadline,
        )
        .await
    }

    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        self.bounded_by(call, Instant::now() + self.timeout).await
    }

    async fn bounded_by<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
        deadline: Instant,
    ) -> Result<T, StoreError> {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let outcome = match tokio::time::timeout_at(deadline, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(StoreError::Redis(e)),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        };
        self.note(outcome.as_ref().err());
        outcome
    }

    /// Record a call's outcome; a change of health is logged once, not per call.
    fn note(&self, error: Option<&StoreError>) {
        let was_up = self.up.swap(error.is_none(), Ordering::AcqRel);
        match (was_up, error) {
            (true, Some(e)) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                self.stats.outages.fetch_add(1, Ordering::AcqRel);
                tracing::error!(target: "sluice::store", error = %e, "store unreachable: on_error applies until it answers again");
            }
            (false, Some(_)) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
            (false, None) => {
                tracing::info!(target: "sluice::store", "store reachable: shared limits in force");
            }
            (true, None) => {}
        }
    }
}

/// A script whose source is compiled into sluice.
pub fn script(source: &str) -> Script {
    Script::new(source)
}
