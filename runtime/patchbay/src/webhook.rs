//! Webhooks: a call placed through the API reports each change of its status (`ringing`,
//! `answered`, `completed`, …) by `POST`ing its view as JSON to the URL the `POST /v1/calls`
//! named.
//!
//! A tenant may only name URLs under one of its configured `webhooks` prefixes (deny by
//! default: Patchbay never connects anywhere a tenant did not allow). Each request carries
//! `X-Patchbay-Signature: sha256=HEX`, the HMAC-SHA256 of the body under the tenant's
//! `webhook_secret`, when it has one, so the receiver can tell it came from us. Deliveries of one
//! call go in order, one at a time; each is tried three times (5 s timeout, 1 s then 4 s
//! apart). A call moves forward only, so it has five events at most, the final status last.

use std::sync::Arc;
use std::time::Duration;

use hmac::Mac;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use tokio::sync::mpsc;

use crate::originate::CallView;

/// Tries per event.
const ATTEMPTS: usize = 3;
/// Longest one try may take (connect, TLS, request and response).
const TIMEOUT: Duration = Duration::from_secs(5);

/// Why a webhook URL is refused or a delivery failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WebhookError {
    /// Not `http://` or `https://` with a host, or not under one of the tenant's prefixes.
    #[error("webhook {0:?} is not allowed for this tenant (see `webhooks` in its configuration)")]
    NotAllowed(String),
    /// `[cdr] webhook` is not an `http://` or `https://` URL with a host (and no user info, dot
    /// segments or control characters).
    #[error("[cdr] webhook {0:?}: not a usable http:// or https:// URL")]
    NotUsable(String),
    /// The receiver could not be reached or answered with an error.
    #[error("webhook delivery to {url}: {reason}")]
    Delivery {
        /// Where.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

/// Where one call's events go.
#[derive(Clone)]
pub struct Webhook {
    url: hyper::Uri,
    secret: Option<crate::config::Secret>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook").field("url", &self.url).finish_non_exhaustive()
    }
}

impl Webhook {
    /// Checks `url` against the tenant's allowed prefixes (compared after parsing, so that
    /// `http://allowed.example@evil.example/` cannot pass as `http://allowed.example`).
    pub fn new(
        url: &str,
        allowed: &[String],
        secret: Option<crate::config::Secret>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, WebhookError> {
        let refused = || WebhookError::NotAllowed(url.to_owned());
        let parsed: hyper::Uri = url.parse().map_err(|_| refused())?;
        let scheme_ok = matches!(parsed.scheme_str(), Some("http" | "https"));
        let authority = parsed.authority().ok_or_else(refused)?;
        if !scheme_ok || authority.as_str().contains('@') || url.chars().any(char::is_control) {
            return Err(refused());
        }
        // Dot segments (plain or percent-encoded) could climb out of an allowed prefix at the
        // receiver: `/patchbay/../admin`.
        let path = parsed.path().to_ascii_lowercase().replace("%2e", ".");
        if path.split('/').any(|segment| segment == "." || segment == "..") {
            return Err(refused());
        }
        let normal = format!("{}://{}{}", parsed.scheme_str().unwrap_or_default(), authority, parsed.path());
        let under = |prefix: &String| {
            let prefix = prefix.trim_end_matches('/');
            normal == prefix || normal.starts_with(&format!("{prefix}/"))
        };
        if !allowed.iter().any(under) {
            return Err(refused());
        }
        let tls = match parsed.scheme_str() {
            Some("https") => Some(tls.ok_or_else(refused)?),
            _ => None,
        };
        Ok(Self { url: parsed, secret, tls })
    }

    /// The CDR webhook (`[cdr] webhook`): the configured URL is its own allowed prefix (its
    /// query, which often carries the receiver's token, left out of the comparison).
    pub fn for_cdrs(url: &str, secret: Option<crate::config::Secret>) -> Result<Self, WebhookError> {
        let prefix = url.split_once('?').map_or(url, |(before, _)| before).to_owned();
        let tls = crate::transport::tls_client_config(None).ok();
        Self::new(url, &[prefix], secret, tls).map_err(|e| match e {
            WebhookError::NotAllowed(url) => WebhookError::NotUsable(url),
            other => other,
        })
    }

    /// Starts delivering: returns where to send the call's views; the task ends when the
    /// sender is dropped and what was queued is delivered.
    pub fn start(self) -> mpsc::UnboundedSender<CallView> {
        let (events, mut queue) = mpsc::unbounded_channel::<CallView>();
        tokio::spawn(async move {
            while let Some(view) = queue.recv().await {
                let body = match serde_json::to_vec(&view) {
                    Ok(body) => body,
                    Err(e) => {
                        tracing::error!("webhook body: {e}");
                        continue;
                    }
                };
                // 1 s, then 4 s between the tries.
                let waits = (0..ATTEMPTS as u32 - 1).map(|n| Duration::from_secs(4u64.pow(n)));
                if !self.post_until_taken(&body, waits, &view.id).await {
                    tracing::warn!(id = %view.id, to = %self.shown(), "webhook event not delivered after {ATTEMPTS} tries");
                }
            }
        });
        events
    }

    /// Posts `body` until the receiver takes it (2xx), waiting each of `waits` between two
    /// tries: one try more than there are waits. Returns whether it was taken.
    async fn post_until_taken(&self, body: &[u8], waits: impl Iterator<Item = Duration>, what: &str) -> bool {
        let mut waits = waits.peekable();
        for attempt in 1.. {
            match tokio::time::timeout(TIMEOUT, self.post(body)).await {
                Ok(Ok(())) => return true,
                Ok(Err(e)) => tracing::warn!(what, attempt, "{e}"),
                Err(_) => tracing::warn!(what, attempt, to = %self.shown(), "webhook delivery timed out"),
            }
            match waits.next() {
                Some(wait) => tokio::time::sleep(wait).await,
                None => return false,
            }
        }
        false
    }

    /// The URL without its query, for logs (a query often carries the receiver's token).
    fn shown(&self) -> String {
        format!(
            "{}://{}{}",
            self.url.scheme_str().unwrap_or_default(),
            self.url.authority().map_or("", |a| a.as_str()),
            self.url.path()
        )
    }

    async fn post(&self, body: &[u8]) -> Result<(), WebhookError> {
        let fail = |reason: String| WebhookError::Delivery { url: self.shown(), reason };
        let host = self.url.host().ok_or_else(|| fail("no host".into()))?;
        let https = self.tls.is_some();
        let port = self.url.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|e| fail(format!("connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let mut request = hyper::Request::post(self.url.path_and_query().map_or("/", |p| p.as_str()))
            .header(hyper::header::HOST, self.url.authority().map_or(host, |a| a.as_str()))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, concat!("Patchbay/", env!("CARGO_PKG_VERSION")));
        if let Some(secret) = &self.secret {
            request = request.header("X-Patchbay-Signature", signature(secret.expose(), body));
        }
        let request =
            request.body(Full::new(Bytes::copy_from_slice(body))).map_err(|e| fail(format!("request: {e}")))?;
        let status = match &self.tls {
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
                    .map_err(|e| fail(format!("server name: {e}")))?;
                let stream = tokio_rustls::TlsConnector::from(Arc::clone(tls))
                    .connect(name, tcp)
                    .await
                    .map_err(|e| fail(format!("TLS: {e}")))?;
                send(hyper_util::rt::TokioIo::new(stream), request).await.map_err(fail)?
            }
            None => send(hyper_util::rt::TokioIo::new(tcp), request).await.map_err(fail)?,
        };
        if status.is_success() { Ok(()) } else { Err(fail(format!("answered {status}"))) }
    }
}

/// One HTTP/1.1 exchange over `io`; the response's status (its body is read and dropped).
async fn send<T>(io: T, request: hyper::Request<Full<Bytes>>) -> Result<hyper::StatusCode, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    // Read (a bounded amount of) the body so the connection closes cleanly.
    let _ = http_body_util::Limited::new(response.into_body(), 64 * 1024).collect().await;
    Ok(status)
}

/// Records queued for the CDR webhook; beyond it a record is only in the file (counted in
/// `patchbay_cdr_deliveries_dropped_total`).
pub const CDR_QUEUE: usize = 10_000;
/// Tries per record before it is given up (counted in `patchbay_cdr_delivery_failures_total`):
/// 1 s, 2 s, 4 s … apart, at most [`CDR_BACKOFF_MAX`], about ten minutes in all.
const CDR_ATTEMPTS: u32 = 15;
const CDR_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Delivers CDRs (`[cdr] webhook`): each record's JSON line is `POST`ed, in order, one at a
/// time, until the receiver answers 2xx, tried [`CDR_ATTEMPTS`] times with doubling back-off.
/// At least once: a delivery whose answer was lost is sent again, so receivers deduplicate by
/// the record's `id`. Returns where the CDR writer offers lines (see `CdrOutput::tap`).
pub fn deliver_cdrs(hook: Webhook) -> mpsc::Sender<crate::cdr::Tapped> {
    let (lines, mut queue) = mpsc::channel::<crate::cdr::Tapped>(CDR_QUEUE);
    tokio::spawn(async move {
        while let Some(tapped) = queue.recv().await {
            let line = match tapped {
                crate::cdr::Tapped::Line(line) => line,
                crate::cdr::Tapped::Flush(done) => {
                    let _ = done.send(());
                    continue;
                }
            };
            // 1 s, 2 s, 4 s … at most CDR_BACKOFF_MAX between the tries.
            let waits =
                (0..CDR_ATTEMPTS - 1).map(|n| (Duration::from_secs(1) * 2u32.saturating_pow(n)).min(CDR_BACKOFF_MAX));
            if hook.post_until_taken(line.as_bytes(), waits, "CDR").await {
                crate::metrics::METRICS.cdr_deliveries.inc();
            } else {
                crate::metrics::METRICS.cdr_delivery_failures.inc();
                tracing::error!(to = %hook.shown(), "CDR not delivered after {CDR_ATTEMPTS} tries (it is in the CDR file)");
            }
        }
    });
    lines
}

/// `sha256=HEX` of the HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    // HMAC takes a key of any length (RFC 2104 §2): this cannot fail.
    let mut mac = match hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed() -> Vec<String> {
        vec!["https://hooks.example.com/patchbay".into(), "http://127.0.0.1:9000/".into()]
    }

    fn tls() -> Option<Arc<rustls::ClientConfig>> {
        crate::transport::tls_client_config(None).ok()
    }

    #[test]
    fn only_urls_under_the_tenants_prefixes_are_taken() {
        for good in [
            "https://hooks.example.com/patchbay",
            "https://hooks.example.com/patchbay/calls?x=1",
            "http://127.0.0.1:9000/x",
        ] {
            assert!(Webhook::new(good, &allowed(), None, tls()).is_ok(), "{good}");
        }
        for bad in [
            "https://hooks.example.com/patchbay-evil",
            "https://hooks.example.com.evil.example/patchbay",
            "https://hooks.example.com@evil.example/patchbay",
            "http://127.0.0.1:9001/",
            "http://169.254.169.254/latest/meta-data",
            "ftp://127.0.0.1:9000/",
            "http://127.0.0.1:9000/\r\nX: y",
            "https://hooks.example.com/patchbay/../admin",
            "https://hooks.example.com/patchbay/%2E%2e/admin",
        ] {
            assert!(Webhook::new(bad, &allowed(), None, tls()).is_err(), "{bad}");
        }
        assert!(Webhook::new("http://127.0.0.1:9000/", &[], None, tls()).is_err(), "deny by default");
    }

    #[test]
    fn the_cdr_webhook_takes_its_own_url_with_a_query_but_no_dot_segments() {
        assert!(Webhook::for_cdrs("https://billing.example/cdr?token=abc", None).is_ok());
        assert!(Webhook::for_cdrs("http://127.0.0.1:9000/cdr", None).is_ok());
        assert!(Webhook::for_cdrs("https://billing.example/a/../admin", None).is_err());
    }

    #[test]
    fn the_signature_is_the_hmac_of_the_body() {
        // RFC 4231 test case 2.
        let sig = signature("Jefe", b"what do ya want for nothing?");
        assert_eq!(sig, "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    /// A receiver on a free port: answers its requests with `statuses` in turn (then 204), and
    /// hands each request (head and body) over.
    async fn receiver(statuses: Vec<u16>) -> (u16, mpsc::UnboundedReceiver<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (got, received) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut statuses = statuses.into_iter();
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { return };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Read the head and a body of Content-Length bytes.
                let request = loop {
                    let Ok(n) = stream.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned())
                            })
                            .and_then(|v| v.parse::<usize>().ok())
                            .unwrap_or(0);
                        if body.len() >= length {
                            break text;
                        }
                    }
                };
                let status = statuses.next().unwrap_or(204);
                let answer = format!("HTTP/1.1 {status} Whatever\r\ncontent-length: 0\r\n\r\n");
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = got.send(request);
            }
        });
        (port, received)
    }

    #[tokio::test]
    async fn events_are_posted_in_order_with_their_signature() {
        let (port, mut received) = receiver(Vec::new()).await;
        let allowed = vec![format!("http://127.0.0.1:{port}/")];
        let secret = Some(crate::config::Secret::from("s3cret".to_owned()));
        let hook = Webhook::new(&format!("http://127.0.0.1:{port}/hook"), &allowed, secret, None).expect("allowed");
        let events = hook.start();
        for status in [crate::originate::CallStatus::Ringing, crate::originate::CallStatus::Completed] {
            let view = CallView {
                id: "abc".into(),
                tenant: "t".into(),
                trunk: "c".into(),
                flow: "greet".into(),
                to: "+1".into(),
                from: "+2".into(),
                status,
                sip_code: None,
                reason: None,
                created: String::new(),
                answered: None,
                ended: None,
            };
            events.send(view).expect("queued");
        }
        for want in ["\"ringing\"", "\"completed\""] {
            let request = tokio::time::timeout(Duration::from_secs(5), received.recv())
                .await
                .expect("delivered")
                .expect("request");
            assert!(request.starts_with("POST /hook HTTP/1.1"), "{request}");
            assert!(request.contains(want), "{want}: {request}");
            let (head, body) = request.split_once("\r\n\r\n").expect("head and body");
            let expected = signature("s3cret", body.as_bytes());
            assert!(head.to_ascii_lowercase().contains(&format!("x-patchbay-signature: {expected}")), "{head}");
        }
    }

    #[tokio::test]
    async fn cdrs_are_retried_until_taken_and_go_in_order() {
        // The receiver is down for the first try (503), then takes everything.
        let (port, mut received) = receiver(vec![503]).await;
        let url = format!("http://127.0.0.1:{port}/cdr");
        let secret = Some(crate::config::Secret::from("k".to_owned()));
        let hook = Webhook::new(&url, std::slice::from_ref(&url), secret, None).expect("its own URL");
        let lines = deliver_cdrs(hook);
        for id in ["one", "two"] {
            lines.try_send(crate::cdr::Tapped::Line(format!("{{\"id\":\"{id}\"}}").into())).expect("queued");
        }
        let (done, flushed) = tokio::sync::oneshot::channel();
        lines.try_send(crate::cdr::Tapped::Flush(done)).expect("queued");
        let mut bodies = Vec::new();
        for _ in 0..3 {
            let request = tokio::time::timeout(Duration::from_secs(5), received.recv())
                .await
                .expect("delivered")
                .expect("request");
            let (head, body) = request.split_once("\r\n\r\n").expect("head and body");
            assert!(head.starts_with("POST /cdr HTTP/1.1"), "{head}");
            assert!(
                head.to_ascii_lowercase()
                    .contains(&format!("x-patchbay-signature: {}", signature("k", body.as_bytes())))
            );
            bodies.push(body.to_owned());
        }
        // The first record again after the 503, before the second.
        assert_eq!(bodies, ["{\"id\":\"one\"}", "{\"id\":\"one\"}", "{\"id\":\"two\"}"]);
        // A flush behind them is answered once both are delivered.
        tokio::time::timeout(Duration::from_secs(5), flushed).await.expect("flushed").expect("answered");
    }
}
