//! API keys and the per-key rate limit.
//!
//! Keys come from `--api-keys-file`: one `<scope> <key>` per line, scope `read` or
//! `admin`, `#` starts a comment. A request presents its key as
//! `Authorization: Bearer <key>` or `X-API-Key: <key>`. `read` may embed, verify,
//! identify and call every GET endpoint; `admin` may do everything, including
//! gallery writes. A missing or unknown key is 401, a key without the needed scope
//! 403. Keys are compared in constant time and never logged.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::IntCounter;
use subtle::ConstantTimeEq;

use crate::error::{ApiError, ErrorKind};
use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Read,
    Admin,
}

impl Scope {
    fn parse(s: &str) -> Option<Scope> {
        match s {
            "read" => Some(Scope::Read),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }
}

/// The keys of one keys file. `Debug` prints counts only, so a stray `{:?}` cannot leak a key.
pub struct ApiKeys {
    keys: Vec<(Scope, Vec<u8>)>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let admin = self.keys.iter().filter(|(s, _)| *s == Scope::Admin).count();
        write!(
            f,
            "ApiKeys {{ admin: {admin}, read: {} }}",
            self.keys.len() - admin
        )
    }
}

/// Shortest key accepted: anything shorter is guessable.
const MIN_KEY_LEN: usize = 16;

impl ApiKeys {
    pub fn load(path: &Path) -> anyhow::Result<ApiKeys> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read API keys file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in API keys file {}", path.display()))
    }

    /// Parses the file format. Error messages name the line, never the key.
    pub fn parse(text: &str) -> anyhow::Result<ApiKeys> {
        let mut keys: Vec<(Scope, Vec<u8>)> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(scope), Some(key), None) = (parts.next(), parts.next(), parts.next()) else {
                bail!("line {}: expected `<scope> <key>`", i + 1);
            };
            let Some(scope) = Scope::parse(scope) else {
                bail!("line {}: scope must be `read` or `admin`", i + 1);
            };
            if key.len() < MIN_KEY_LEN {
                bail!("line {}: key shorter than {MIN_KEY_LEN} characters", i + 1);
            }
            if keys.iter().any(|(_, k)| k.as_slice() == key.as_bytes()) {
                bail!("line {}: duplicate key", i + 1);
            }
            keys.push((scope, key.as_bytes().to_vec()));
        }
        if keys.is_empty() {
            bail!("no keys (an empty keys file would lock every client out)");
        }
        Ok(ApiKeys { keys })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Index and scope of the matching key. Every stored key is compared, whatever
    /// matched, so the time taken does not tell which key (or how many) came close.
    fn lookup(&self, presented: &[u8]) -> Option<(usize, Scope)> {
        let mut found: Option<(usize, Scope)> = None;
        for (i, (scope, key)) in self.keys.iter().enumerate() {
            let eq: bool = key.as_slice().ct_eq(presented).into();
            if eq {
                found = Some((i, *scope));
            }
        }
        found
    }
}

/// The scope a request needs, or `None` for the open endpoints (probes, and the
/// metrics scrape unless `metrics_require_key`).
pub fn required_scope(method: &Method, path: &str, metrics_require_key: bool) -> Option<Scope> {
    match path {
        "/healthz" | "/readyz" | "/openapi.json" => None,
        "/metrics" if !metrics_require_key => None,
        _ if method == Method::GET || method == Method::HEAD => Some(Scope::Read),
        "/embed" | "/detect" | "/verify" | "/identify" if method == Method::POST => {
            Some(Scope::Read)
        }
        _ => Some(Scope::Admin),
    }
}

/// The key a request presents, if any: `Authorization: Bearer` first, then `X-API-Key`.
fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.as_bytes();
        let prefix = b"bearer ";
        if v.len() > prefix.len() && v[..prefix.len()].eq_ignore_ascii_case(prefix) {
            return Some(v[prefix.len()..].trim_ascii());
        }
        return None;
    }
    headers.get("x-api-key").map(|v| v.as_bytes().trim_ascii())
}

/// Token bucket per key: `rate` requests per second on average, bursts of up to
/// `max(rate, 1)` requests.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<usize, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(rate_per_s: f64) -> Option<RateLimiter> {
        (rate_per_s > 0.0 && rate_per_s.is_finite()).then(|| RateLimiter {
            rate: rate_per_s,
            burst: rate_per_s.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Takes one token for `key`, or says how long until one is available.
    pub fn check(&self, key: usize, now: Instant) -> Result<(), Duration> {
        // A poisoned lock only means another request panicked mid-update; the
        // bucket numbers are still usable.
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = buckets.entry(key).or_insert((self.burst, now));
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate))
        }
    }
}

/// Failed authentications per client address: a token bucket of `per_minute` failures
/// (bursts of as many). An address with no token left is refused 429 on every route that
/// needs a key, its right keys included, so a guesser learns nothing until it has waited.
pub struct FailureThrottle {
    per_s: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

/// Addresses tracked at most; beyond it, those that have fully recovered are forgotten.
const MAX_TRACKED_ADDRESSES: usize = 65_536;

impl FailureThrottle {
    pub fn new(per_minute: f64) -> Option<FailureThrottle> {
        (per_minute > 0.0 && per_minute.is_finite()).then(|| FailureThrottle {
            per_s: per_minute / 60.0,
            burst: per_minute.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    fn refill(&self, bucket: &mut (f64, Instant), now: Instant) {
        let elapsed = now.saturating_duration_since(bucket.1).as_secs_f64();
        bucket.0 = (bucket.0 + elapsed * self.per_s).min(self.burst);
        bucket.1 = now;
    }

    /// How long `ip` must wait, if it has used up its failures.
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.get_mut(&ip)?;
        self.refill(bucket, now);
        (bucket.0 < 1.0).then(|| Duration::from_secs_f64((1.0 - bucket.0) / self.per_s))
    }

    pub fn record_failure(&self, ip: IpAddr, now: Instant) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_TRACKED_ADDRESSES && !buckets.contains_key(&ip) {
            let (per_s, burst) = (self.per_s, self.burst);
            buckets.retain(|_, (tokens, last)| {
                *tokens + now.saturating_duration_since(*last).as_secs_f64() * per_s < burst
            });
            if buckets.len() >= MAX_TRACKED_ADDRESSES {
                // Every tracked address is mid-penalty: forgetting one at random is all
                // a bounded table can do.
                if let Some(k) = buckets.keys().next().copied() {
                    buckets.remove(&k);
                }
            }
        }
        let bucket = buckets.entry(ip).or_insert((self.burst, now));
        self.refill(bucket, now);
        bucket.0 = (bucket.0 - 1.0).max(0.0);
    }
}

/// What the auth middleware needs; built once at start.
pub struct Auth {
    pub keys: Option<ApiKeys>,
    pub metrics_require_key: bool,
    pub limiter: Option<RateLimiter>,
    pub failures: Option<FailureThrottle>,
    failures_total: Option<IntCounter>,
    throttled_total: Option<IntCounter>,
}

impl Auth {
    /// Without a keys file the service is open (the caller logs a warning).
    pub fn from_config(cfg: &crate::config::Config, metrics: &Metrics) -> anyhow::Result<Auth> {
        let keys = cfg
            .api_keys_file
            .as_deref()
            .map(ApiKeys::load)
            .transpose()?;
        Ok(Auth {
            keys,
            metrics_require_key: cfg.metrics_require_key,
            limiter: RateLimiter::new(cfg.rate_limit_per_key),
            failures: FailureThrottle::new(cfg.auth_failures_per_minute),
            failures_total: Some(metrics.auth_failures.clone()),
            throttled_total: Some(metrics.auth_throttled.clone()),
        })
    }

    /// `check`, with failed authentications counted against the client's address and an
    /// address over its allowance refused before its key is even looked at.
    pub fn check_from(
        &self,
        client: Option<IpAddr>,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<(), Rejection> {
        let throttle = match (&self.keys, &self.failures, client) {
            (Some(_), Some(t), Some(ip))
                if required_scope(method, path, self.metrics_require_key).is_some() =>
            {
                Some((t, ip))
            }
            _ => None,
        };
        let now = Instant::now();
        if let Some((t, ip)) = throttle {
            if let Some(wait) = t.blocked(ip, now) {
                if let Some(c) = &self.throttled_total {
                    c.inc();
                }
                return Err(Rejection {
                    error: ApiError::new(
                        ErrorKind::RateLimited,
                        "too many failed authentications from this address; wait before retrying",
                    ),
                    retry_after_s: Some(wait.as_secs_f64().ceil().max(1.0) as u64),
                });
            }
        }
        let result = self.check(method, path, headers);
        if matches!(&result, Err(r) if r.error.kind == ErrorKind::Unauthorized) {
            if let Some(c) = &self.failures_total {
                c.inc();
            }
            if let Some((t, ip)) = throttle {
                t.record_failure(ip, now);
            }
        }
        result
    }

    /// Decides one request: `Ok` to pass it on, or the rejection to send.
    pub fn check(&self, method: &Method, path: &str, headers: &HeaderMap) -> Result<(), Rejection> {
        let Some(keys) = &self.keys else {
            return Ok(());
        };
        let Some(needed) = required_scope(method, path, self.metrics_require_key) else {
            return Ok(());
        };
        let Some(presented) = presented_key(headers) else {
            return Err(Rejection::unauthorized(
                "missing API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`",
            ));
        };
        let Some((index, scope)) = keys.lookup(presented) else {
            return Err(Rejection::unauthorized("unknown API key"));
        };
        if scope < needed {
            let message = format!(
                "this key has scope `{}`; {method} {path} needs `{}`",
                scope.as_str(),
                needed.as_str()
            );
            return Err(Rejection {
                error: ApiError::new(ErrorKind::Forbidden, message),
                retry_after_s: None,
            });
        }
        if let Some(limiter) = &self.limiter {
            if let Err(wait) = limiter.check(index, Instant::now()) {
                return Err(Rejection {
                    error: ApiError::new(
                        ErrorKind::RateLimited,
                        "rate limit for this API key exceeded",
                    ),
                    retry_after_s: Some(wait.as_secs_f64().ceil().max(1.0) as u64),
                });
            }
        }
        Ok(())
    }
}

/// Why the auth layer refused a request; becomes the usual JSON error response.
#[derive(Debug)]
pub struct Rejection {
    pub error: ApiError,
    retry_after_s: Option<u64>,
}

impl Rejection {
    fn unauthorized(message: &str) -> Rejection {
        Rejection {
            error: ApiError::new(ErrorKind::Unauthorized, message),
            retry_after_s: None,
        }
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let kind = self.error.kind;
        let mut resp = self.error.into_response();
        if kind == ErrorKind::Unauthorized {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = self.retry_after_s {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// Axum middleware: `axum::middleware::from_fn_with_state(auth, auth::middleware)`.
/// Add it with `Router::layer` so the route template is known; unmatched paths are
/// checked by their raw path (and need a key like any other non-probe path).
pub async fn middleware(State(auth): State<Arc<Auth>>, req: Request, next: Next) -> Response {
    let path = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| req.uri().path().to_owned());
    let client = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    match auth.check_from(client, req.method(), &path, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(rejection) => rejection.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADMIN: &str = "admin-key-0123456789abcdef";
    const READ: &str = "read-key-0123456789abcdef";

    fn auth(rate: f64) -> Auth {
        let text = format!("# comment\n\nadmin {ADMIN}\n  read {READ}  \n");
        Auth {
            keys: Some(ApiKeys::parse(&text).unwrap()),
            metrics_require_key: false,
            limiter: RateLimiter::new(rate),
            failures: None,
            failures_total: None,
            throttled_total: None,
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn status(r: Result<(), Rejection>) -> u16 {
        match r {
            Ok(()) => 200,
            Err(rejection) => rejection.into_response().status().as_u16(),
        }
    }

    #[test]
    fn parse_rejects_bad_files_without_echoing_keys() {
        for (text, why) in [
            ("", "no keys"),
            ("# only a comment\n", "no keys"),
            ("write abcdefghijklmnopqrstuvwxyz\n", "scope must be"),
            ("read\n", "expected"),
            ("read a b\n", "expected"),
            ("read short\n", "shorter"),
            (
                "read abcdefghijklmnopqrstuvwxyz\nadmin abcdefghijklmnopqrstuvwxyz\n",
                "duplicate",
            ),
        ] {
            let err = format!("{:#}", ApiKeys::parse(text).unwrap_err());
            assert!(err.contains(why), "{text:?}: got {err:?}, wanted {why:?}");
            assert!(
                !err.contains("abcdefghij"),
                "error message leaks the key: {err}"
            );
        }
        let keys = ApiKeys::parse(&format!("admin {ADMIN}\nread {READ}\n")).unwrap();
        assert_eq!(keys.len(), 2);
        assert!(!format!("{keys:?}").contains(ADMIN));
    }

    #[test]
    fn scopes_per_route() {
        let m = |s: &str| Method::from_bytes(s.as_bytes()).unwrap();
        for (method, path, want) in [
            ("GET", "/healthz", None),
            ("GET", "/readyz", None),
            ("GET", "/metrics", None),
            ("GET", "/openapi.json", None),
            ("POST", "/embed", Some(Scope::Read)),
            ("POST", "/verify", Some(Scope::Read)),
            ("POST", "/identify", Some(Scope::Read)),
            ("GET", "/subjects", Some(Scope::Read)),
            ("GET", "/subjects/{id}", Some(Scope::Read)),
            ("POST", "/subjects", Some(Scope::Admin)),
            ("DELETE", "/subjects/{id}", Some(Scope::Admin)),
            ("POST", "/subjects/{id}/faces", Some(Scope::Admin)),
            (
                "DELETE",
                "/subjects/{id}/faces/{face_id}",
                Some(Scope::Admin),
            ),
            ("POST", "/nonexistent", Some(Scope::Admin)),
        ] {
            assert_eq!(
                required_scope(&m(method), path, false),
                want,
                "{method} {path}"
            );
        }
        assert_eq!(
            required_scope(&Method::GET, "/metrics", true),
            Some(Scope::Read)
        );
    }

    #[test]
    fn credentials_table() {
        let a = auth(0.0);
        let bearer_read = format!("Bearer {READ}");
        let bearer_admin = format!("bearer {ADMIN}");
        for (method, path, hdrs, want, case) in [
            (Method::POST, "/embed", vec![], 401, "no key"),
            (
                Method::POST,
                "/embed",
                vec![("authorization", "Bearer nope-nope-nope-nope")],
                401,
                "unknown bearer",
            ),
            (
                Method::POST,
                "/embed",
                vec![("x-api-key", "nope-nope-nope-nope")],
                401,
                "unknown x-api-key",
            ),
            (
                Method::POST,
                "/embed",
                vec![("authorization", READ)],
                401,
                "no Bearer prefix",
            ),
            (
                Method::POST,
                "/embed",
                vec![("authorization", "Basic dXNlcjpwYXNz")],
                401,
                "basic auth",
            ),
            (
                Method::POST,
                "/embed",
                vec![("x-api-key", &READ[..READ.len() - 1])],
                401,
                "key prefix",
            ),
            (
                Method::POST,
                "/embed",
                vec![("authorization", &bearer_read)],
                200,
                "read key embeds",
            ),
            (
                Method::POST,
                "/embed",
                vec![("x-api-key", READ)],
                200,
                "read key via x-api-key",
            ),
            (
                Method::POST,
                "/subjects",
                vec![("authorization", &bearer_read)],
                403,
                "read key cannot enrol",
            ),
            (
                Method::DELETE,
                "/subjects/{id}",
                vec![("x-api-key", READ)],
                403,
                "read key cannot delete",
            ),
            (
                Method::POST,
                "/subjects",
                vec![("authorization", &bearer_admin)],
                200,
                "admin enrols",
            ),
            (
                Method::GET,
                "/subjects",
                vec![("x-api-key", ADMIN)],
                200,
                "admin reads",
            ),
            (Method::GET, "/healthz", vec![], 200, "probe open"),
            (Method::GET, "/metrics", vec![], 200, "metrics open"),
        ] {
            assert_eq!(
                status(a.check(&method, path, &headers(&hdrs))),
                want,
                "{case}"
            );
        }
    }

    #[test]
    fn unauthorized_asks_for_bearer_and_forbidden_names_scope() {
        let a = auth(0.0);
        let resp = a
            .check(&Method::POST, "/embed", &HeaderMap::new())
            .unwrap_err()
            .into_response();
        assert_eq!(
            resp.headers().get(header::WWW_AUTHENTICATE).unwrap(),
            "Bearer"
        );
        assert_eq!(
            resp.extensions().get::<ErrorKind>(),
            Some(&ErrorKind::Unauthorized)
        );
        let resp = a
            .check(&Method::POST, "/subjects", &headers(&[("x-api-key", READ)]))
            .unwrap_err()
            .into_response();
        assert_eq!(
            resp.extensions().get::<ErrorKind>(),
            Some(&ErrorKind::Forbidden)
        );
    }

    #[test]
    fn metrics_can_require_a_key() {
        let mut a = auth(0.0);
        a.metrics_require_key = true;
        assert_eq!(
            status(a.check(&Method::GET, "/metrics", &HeaderMap::new())),
            401
        );
        assert_eq!(
            status(a.check(&Method::GET, "/metrics", &headers(&[("x-api-key", READ)]))),
            200
        );
    }

    #[test]
    fn rate_limit_per_key_with_retry_after() {
        let a = auth(2.0);
        let read = headers(&[("x-api-key", READ)]);
        let admin = headers(&[("x-api-key", ADMIN)]);
        // Burst of 2, then the third is refused; the other key has its own bucket.
        assert_eq!(status(a.check(&Method::POST, "/embed", &read)), 200);
        assert_eq!(status(a.check(&Method::POST, "/embed", &read)), 200);
        let resp = a
            .check(&Method::POST, "/embed", &read)
            .unwrap_err()
            .into_response();
        assert_eq!(resp.status().as_u16(), 429);
        let secs: u64 = resp
            .headers()
            .get(header::RETRY_AFTER)
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(secs >= 1);
        assert_eq!(status(a.check(&Method::POST, "/embed", &admin)), 200);
    }

    #[test]
    fn token_bucket_refills() {
        let l = RateLimiter::new(10.0).unwrap();
        let t0 = Instant::now();
        for _ in 0..10 {
            assert!(l.check(0, t0).is_ok());
        }
        let wait = l.check(0, t0).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        assert!(l.check(0, t0 + Duration::from_millis(100)).is_ok());
        assert!(l.check(0, t0 + Duration::from_millis(100)).is_err());
        assert!(RateLimiter::new(0.0).is_none());
    }

    #[test]
    fn open_without_keys_file() {
        let a = Auth {
            keys: None,
            metrics_require_key: true,
            limiter: None,
            failures: None,
            failures_total: None,
            throttled_total: None,
        };
        assert_eq!(
            status(a.check(&Method::DELETE, "/subjects/{id}", &HeaderMap::new())),
            200
        );
    }

    #[test]
    fn failed_authentications_are_throttled_per_address() {
        let mut a = auth(0.0);
        a.failures = FailureThrottle::new(3.0);
        let (guesser, other): (IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let wrong = headers(&[("x-api-key", "nope-nope-nope-nope")]);
        let right = headers(&[("x-api-key", READ)]);
        let try_ = |ip, h: &HeaderMap| a.check_from(Some(ip), &Method::POST, "/embed", h);
        for _ in 0..3 {
            assert_eq!(status(try_(guesser, &wrong)), 401);
        }
        // Out of failures: refused before the key is looked at, the right key included.
        let resp = try_(guesser, &right).unwrap_err().into_response();
        assert_eq!(resp.status().as_u16(), 429);
        let secs: u64 = resp.headers()[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=20).contains(&secs), "{secs}");
        assert_eq!(status(try_(guesser, &wrong)), 429);
        // Another address and the open probes are unaffected.
        assert_eq!(status(try_(other, &right)), 200);
        assert_eq!(
            status(a.check_from(Some(guesser), &Method::GET, "/healthz", &wrong)),
            200
        );
    }

    #[test]
    fn throttle_refills_and_stays_bounded() {
        let t = FailureThrottle::new(60.0).unwrap(); // one failure back per second
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..60 {
            t.record_failure(ip, t0);
        }
        assert!(t.blocked(ip, t0).is_some());
        assert!(t.blocked(ip, t0 + Duration::from_millis(1100)).is_none());
        for i in 0..(MAX_TRACKED_ADDRESSES as u32 + 10) {
            t.record_failure(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(t.buckets.lock().unwrap().len() <= MAX_TRACKED_ADDRESSES);
    }
}
