//! The HTTP/JSON control API (`[api]`, `docs/api.md`).
//!
//! - `POST /v1/calls` places a call through a tenant's trunk and runs a flow when the callee
//!   answers; `GET /v1/calls/{id}` reports its progress; `DELETE /v1/calls/{id}` hangs it up.
//! - `GET /v1/trunks` lists the caller's trunks with their registration state.
//!
//! Every request carries `Authorization: Bearer TOKEN`: the admin token reaches every tenant
//! (requests name the tenant with `"tenant"`), a tenant's token only its own calls and trunks.
//! Errors are JSON `{"error": {"code": "...", "message": "..."}}` with a stable `code`.
//! Secrets never appear in answers or logs.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use patchbay_host::FlowRegistry;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::cdr::CdrSink;
use crate::endpoint::Command;
use crate::originate::{CallStatus, CallView, Origination, Originations, new_call_id};
use crate::tenant::Tenants;
use crate::trunk::check_number;

/// What the API handlers share.
pub struct ApiState {
    /// SHA-256 of the admin token (tokens are compared as digests, so the comparison's time
    /// says nothing about the token).
    pub admin: Option<[u8; 32]>,
    /// Every tenant (tokens, trunks, flows' variables, webhooks); replaced by a reload.
    pub tenants: Arc<crate::reload::Current<Tenants>>,
    /// Compiled flows (a call names one of its tenant's).
    pub registry: Arc<FlowRegistry>,
    /// Compiles deployed flows.
    pub engine: Arc<patchbay_host::FlowEngine>,
    /// Reloads the configuration (`POST /v1/reload`).
    pub reloader: Arc<crate::reload::Reloader>,
    /// Every call up now.
    pub live: Arc<crate::call::LiveCalls>,
    /// The CDR file, when records are written to one (`[cdr] path`).
    pub cdr_path: Option<std::path::PathBuf>,
    /// Originations' progress.
    pub originations: Arc<Originations>,
    /// The SIP endpoint.
    pub commands: mpsc::UnboundedSender<Command>,
    /// Where refused calls' records go.
    pub cdr: CdrSink,
    /// Each trunk's registration state, as the endpoint last reported it.
    pub trunk_states: crate::trunk::TrunkStates,
    /// TLS for `https://` webhooks (public roots).
    pub webhook_tls: Option<Arc<rustls::ClientConfig>>,
    /// Set while draining (`/readyz`).
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// Asks the process to drain (`POST /v1/drain`), as SIGTERM does.
    pub drain: Arc<tokio::sync::Notify>,
}

/// The routes, ready to serve.
pub fn router(state: Arc<ApiState>) -> axum::Router {
    axum::Router::new()
        .route("/v1/calls", post(create_call).get(list_calls))
        .route("/v1/calls/{id}", get(get_call).delete(delete_call))
        .route("/v1/cdrs", get(query_cdrs))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/reload", post(reload))
        .route("/v1/drain", post(drain))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/trunks", get(list_trunks))
        .route("/v1/flows", get(list_flows))
        .route("/v1/tenants", get(list_tenants))
        .route("/v1/tenants/{tenant}/flows", get(list_tenant_flows))
        .route(
            "/v1/tenants/{tenant}/flows/{name}",
            put(deploy_flow)
                .delete(delete_flow)
                .layer(axum::extract::DefaultBodyLimit::max(crate::deploy::MAX_COMPONENT_BYTES)),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not-found", "no such endpoint") })
        .with_state(state)
}

/// Serves the API on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<ApiState>) {
    if let Err(e) = axum::serve(listener, router(state)).await {
        tracing::error!("control API stopped: {e}");
    }
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after: None }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": { "code": self.code, "message": self.message } });
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// Who is asking.
enum Caller {
    Admin,
    Tenant(String),
}

impl Caller {
    /// The tenant a request acts for: a tenant's own, or the one an admin names.
    fn tenant(&self, named: Option<&str>) -> Result<String, ApiError> {
        match (self, named) {
            (Self::Tenant(own), None) => Ok(own.clone()),
            (Self::Tenant(own), Some(named)) if named == own => Ok(own.clone()),
            (Self::Tenant(_), Some(_)) => Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "not your tenant")),
            (Self::Admin, Some(named)) => Ok(named.to_owned()),
            (Self::Admin, None) => {
                Err(ApiError::new(StatusCode::BAD_REQUEST, "tenant-required", "the admin token must name a \"tenant\""))
            }
        }
    }

    fn may_see(&self, tenant: &str) -> bool {
        match self {
            Self::Admin => true,
            Self::Tenant(own) => own == tenant,
        }
    }
}

fn authenticate(state: &ApiState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let unauthorized = || ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "a valid bearer token is required");
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(unauthorized)?;
    let digest = crate::tenant::token_digest(token);
    if state.admin == Some(digest) {
        return Ok(Caller::Admin);
    }
    state.tenants.get().by_token(&digest).map(|tenant| Caller::Tenant(tenant.id.clone())).ok_or_else(unauthorized)
}

/// `POST /v1/calls`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateCall {
    /// Number (or user) to call.
    to: String,
    /// Caller ID; the trunk's default when absent.
    from: Option<String>,
    /// Trunk name; may be left out when the tenant has one trunk.
    trunk: Option<String>,
    /// Flow to run on answer.
    flow: String,
    /// Variables for the flow.
    #[serde(default)]
    vars: BTreeMap<String, String>,
    /// How long it may ring (default 30 s, at most 300).
    ring_timeout_secs: Option<u64>,
    /// Where progress is `POST`ed (under one of the tenant's `webhooks` prefixes).
    webhook: Option<String>,
    /// Display name with the caller ID (the trunk's `caller_name` when absent).
    from_name: Option<String>,
    /// For the admin token: the tenant to act for.
    tenant: Option<String>,
}

/// Most variables a call may bring, and the longest key and value.
const MAX_VARS: usize = 64;
const MAX_VAR_BYTES: usize = 1024;

async fn create_call(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state, &headers)?;
    let request: CreateCall = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid-request", format!("body: {e}")))?;
    let tenant = caller.tenant(request.tenant.as_deref())?;
    // A refusal once the tenant is known leaves a record, as a refused inbound call does.
    place(&state, tenant.clone(), request).await.inspect_err(|error| {
        let view = CallView {
            id: String::new(),
            tenant,
            trunk: String::new(),
            flow: String::new(),
            to: String::new(),
            from: String::new(),
            status: CallStatus::Failed,
            sip_code: None,
            reason: None,
            created: String::new(),
            answered: None,
            ended: None,
        };
        // A tenant nobody configured gets no record (as a call to a domain no tenant serves):
        // there is no tenant to attribute it to, and the name is the caller's.
        if error.status != StatusCode::TOO_MANY_REQUESTS && !matches!(error.code, "shutting-down" | "tenant-not-found")
        {
            crate::originate::write_refused(&state.cdr, &view, error.code);
        }
    })
}

/// The checks and the queueing of `POST /v1/calls` for `tenant`.
async fn place(state: &Arc<ApiState>, tenant_id: String, request: CreateCall) -> Result<Response, ApiError> {
    let tenant = state
        .tenants
        .get()
        .get(&tenant_id)
        .cloned()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "tenant-not-found", "no such tenant"))?;
    if request.from_name.as_ref().is_some_and(|n| n.chars().any(char::is_control) || n.chars().count() > 64) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid-request",
            "from_name: at most 64 characters, no control characters",
        ));
    }
    let webhook = match &request.webhook {
        Some(url) => {
            let secret = tenant.webhook_secret.clone();
            let hook = crate::webhook::Webhook::new(url, &tenant.webhooks, secret, state.webhook_tls.clone())
                .map_err(|e| ApiError::new(StatusCode::FORBIDDEN, "webhook-not-allowed", e.to_string()))?;
            Some(hook)
        }
        None => None,
    };
    let trunk = match &request.trunk {
        Some(name) => tenant.trunk(name).cloned(),
        None => match tenant.trunks.as_slice() {
            [trunk] => Some(Arc::clone(trunk)),
            _ => None,
        },
    }
    .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "trunk-not-found", "no such trunk for this tenant"))?;
    check_number(&request.to).map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, "invalid-number", m))?;
    let caller_id = trunk
        .caller_id(request.from.as_deref())
        .map_err(|e| ApiError::new(StatusCode::FORBIDDEN, "caller-id-not-allowed", e.to_string()))?;
    if state.registry.get(&tenant.id, &request.flow).is_err() {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "flow-not-found", format!("no flow {:?}", request.flow)));
    }
    if request.vars.len() > MAX_VARS
        || request.vars.iter().any(|(k, v)| k.len() > MAX_VAR_BYTES || v.len() > MAX_VAR_BYTES)
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid-request",
            format!("vars: at most {MAX_VARS}, keys and values at most {MAX_VAR_BYTES} bytes"),
        ));
    }
    let ring_timeout = request.ring_timeout_secs.unwrap_or(30);
    if !(1..=300).contains(&ring_timeout) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid-request", "ring_timeout_secs: 1 to 300"));
    }
    let mut vars = tenant.vars_of(&request.flow);
    vars.extend(request.vars);
    let id = new_call_id().map_err(|e| {
        tracing::error!("no randomness from the OS for a call id: {e}");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "no call id could be made")
    })?;
    let view = CallView {
        id: id.clone(),
        tenant: tenant.id.clone(),
        trunk: trunk.name.clone(),
        flow: request.flow.clone(),
        to: request.to.clone(),
        from: caller_id.clone(),
        status: CallStatus::Queued,
        sip_code: None,
        reason: None,
        created: crate::cdr::rfc3339(SystemTime::now()),
        answered: None,
        ended: None,
    };
    if state.originations.insert(view.clone()).is_err() {
        crate::originate::write_refused(&state.cdr, &view, "shutdown");
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting-down", "Patchbay is shutting down"));
    }
    let origination = Origination {
        id: id.clone(),
        trunk: Arc::clone(&trunk),
        to: request.to,
        caller_id,
        caller_name: request.from_name,
        flow: request.flow,
        vars,
        ring_timeout: Duration::from_secs(ring_timeout),
        slots: Default::default(),
        fallback: Vec::new(),
        ringing: false,
        attempted: false,
    };
    let (commands, originations) = (state.commands.clone(), Arc::clone(&state.originations));
    let job = Box::new(move |slots| {
        let mut origination = origination;
        origination.slots = slots;
        // Cancelled while it waited: nothing to place (its record was written then). The
        // endpoint claims it before placing it, so a cancel in between is seen there.
        if originations.get(&origination.id).is_none_or(|v| v.status.is_final()) {
            return;
        }
        tokio::spawn(async move {
            match origination.trunk.targets().await {
                Ok(mut peers) if !peers.is_empty() => {
                    let peer = peers.remove(0);
                    origination.fallback = peers;
                    let _ = commands.send(Command::Originate { origination: Box::new(origination), peer });
                }
                Ok(_) => {
                    let reason = "the trunk's gateway has no address".to_owned();
                    let _ = commands.send(Command::OriginationFailed { origination: Box::new(origination), reason });
                }
                Err(reason) => {
                    tracing::warn!(id = %origination.id, trunk = %origination.trunk.name, "{reason}");
                    let _ = commands.send(Command::OriginationFailed { origination: Box::new(origination), reason });
                }
            }
        });
    });
    if let Err(retry_after) = trunk.gate.enqueue(job) {
        // Never queued: forgotten at once (a flood of refusals must not push out other
        // tenants' finished calls), with its record.
        let reason = format!("trunk {:?} is at its cap and its queue is full", trunk.name);
        state.originations.remove(&id);
        crate::originate::write_refused(&state.cdr, &view, "rate-limited");
        let mut error = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate-limited", reason);
        error.retry_after = Some(retry_after);
        return Err(error);
    }
    if let Some(webhook) = webhook {
        state.originations.watch(&id, webhook.start());
    }
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "id": id, "status": "queued" }))).into_response())
}

async fn get_call(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = authenticate(&state, &headers)?;
    if let Some(view) = state.originations.get(&id).filter(|v| caller.may_see(&v.tenant)) {
        return Ok(Json(serde_json::to_value(view).unwrap_or_default()));
    }
    match state.live.find(&id) {
        Some((_, summary)) if caller.may_see(&summary.tenant) => {
            Ok(Json(serde_json::to_value(summary).unwrap_or_default()))
        }
        _ => Err(ApiError::new(StatusCode::NOT_FOUND, "call-not-found", "no such call")),
    }
}

/// `GET /v1/calls`: the calls up now that the caller may see (an admin may narrow it with
/// `?tenant=`).
async fn list_calls(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    axum::extract::Query(query): axum::extract::Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = authenticate(&state, &headers)?;
    let only = query.get("tenant");
    let calls = state.live.list(|tenant| caller.may_see(tenant) && only.is_none_or(|t| t == tenant));
    Ok(Json(serde_json::json!({ "calls": calls })))
}

async fn delete_call(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = authenticate(&state, &headers)?;
    let Some(view) = state.originations.get(&id).filter(|v| caller.may_see(&v.tenant)) else {
        // A call that came in (or a flow's own): hang it up with BYE.
        return match state.live.find(&id) {
            Some((call, summary)) if caller.may_see(&summary.tenant) => {
                let _ = state.commands.send(Command::HangupCall { call });
                let mut answer = serde_json::to_value(summary).unwrap_or_default();
                answer["status"] = "hanging-up".into();
                Ok(Json(answer))
            }
            _ => Err(ApiError::new(StatusCode::NOT_FOUND, "call-not-found", "no such call")),
        };
    };
    let json = |view: CallView| Json(serde_json::to_value(view).unwrap_or_default());
    if view.status.is_final() {
        return Ok(json(view));
    }
    if let Some(canceled) = state.originations.cancel_queued(&id, "canceled while queued") {
        crate::originate::write_refused(&state.cdr, &canceled, "canceled");
        return Ok(json(canceled));
    }
    let _ = state.commands.send(Command::HangupOrigination { id: id.clone(), reason: "canceled" });
    Ok(json(state.originations.get(&id).unwrap_or(view)))
}

/// Most records one `GET /v1/cdrs` answers with.
const MAX_CDRS: usize = 1000;

/// `GET /v1/cdrs?from=…&to=…&limit=…`: the caller's records whose `start` is in
/// `[from, to)` (RFC 3339 UTC, as records write them, or a prefix of it such as `2026-12-06`),
/// oldest first, at most `limit` (default 100, at most 1,000). Read from the CDR file, so only
/// with `[cdr] path`.
async fn query_cdrs(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    axum::extract::Query(query): axum::extract::Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = authenticate(&state, &headers)?;
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid-request", m);
    let time = |key: &str| -> Result<Option<String>, ApiError> {
        match query.get(key) {
            None => Ok(None),
            Some(t)
                if !t.is_empty() && t.len() <= 24 && t.chars().all(|c| c.is_ascii_digit() || "-T:.Z".contains(c)) =>
            {
                Ok(Some(t.clone()))
            }
            Some(t) => Err(bad(format!("{key}: {t:?} is not an RFC 3339 UTC time like 2026-12-06T10:00:00Z"))),
        }
    };
    let (from, to) = (time("from")?, time("to")?);
    let limit = match query.get("limit") {
        None => 100,
        Some(n) => n
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_CDRS).contains(n))
            .ok_or_else(|| bad(format!("limit: 1 to {MAX_CDRS}")))?,
    };
    let only = query.get("tenant").cloned();
    let path = state.cdr_path.clone().ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "cdrs-not-stored", "records are only logged: set [cdr] path to query them")
    })?;
    // Scanned line by line off the async workers: the file is the store (rotation and an
    // indexed store are the operations issue's).
    let records = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<serde_json::Value>> {
        use std::io::BufRead;
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for line in std::io::BufReader::new(file).lines() {
            let Ok(record) = serde_json::from_str::<serde_json::Value>(&line?) else { continue };
            let tenant = record["tenant"].as_str().unwrap_or_default();
            let start = record["start"].as_str().unwrap_or_default();
            if !caller.may_see(tenant)
                || only.as_deref().is_some_and(|t| t != tenant)
                || from.as_deref().is_some_and(|f| start < f)
                || to.as_deref().is_some_and(|t| start >= t)
            {
                continue;
            }
            out.push(record);
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("reading the CDR file: {e}")))?;
    Ok(Json(serde_json::json!({ "cdrs": records })))
}

/// `POST /v1/reload` (admin token): reloads the configuration file, all or nothing.
async fn reload(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Result<Json<serde_json::Value>, ApiError> {
    if !matches!(authenticate(&state, &headers)?, Caller::Admin) {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "only the admin token reloads"));
    }
    match state.reloader.reload().await {
        Ok(reloaded) => Ok(Json(serde_json::to_value(reloaded).unwrap_or_default())),
        Err(e) => {
            tracing::error!("reload refused, the running configuration stays: {e}");
            Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "reload-refused", e.to_string()))
        }
    }
}

/// `POST /v1/drain` (admin token): stop taking calls and exit once the calls up have ended, as
/// SIGTERM does (`docs/operations.md`). Answered at once; `/readyz` turns 503.
async fn drain(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    if !matches!(authenticate(&state, &headers)?, Caller::Admin) {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "only the admin token drains"));
    }
    state.drain.notify_one();
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "draining": true }))).into_response())
}

/// `GET /healthz` (no token): the process is up and serving this listener.
async fn healthz() -> Response {
    (StatusCode::OK, "ok\n").into_response()
}

/// `GET /readyz` (no token): 200 while taking calls (listeners bound and flows loaded: the
/// API starts after both), 503 while draining — for load balancers and orchestrators.
async fn readyz(State(state): State<Arc<ApiState>>) -> Response {
    if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

/// `GET /metrics` (no token): Prometheus metrics in the OpenMetrics text format
/// (docs/operations.md, "Metrics"). Encoded off the async workers: the work grows with the
/// label sets (tenants × flows).
async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    let encoded = tokio::task::spawn_blocking(move || {
        use crate::metrics::{Scraped, TenantFigures, TrunkFigures};
        let tenants = state.tenants.get();
        let trunks = state.trunk_states.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Scraped {
            flows: state.registry.records(None),
            tenants: tenants
                .iter()
                .map(|t| TenantFigures {
                    id: t.id.clone(),
                    calls: t.live_calls(),
                    instances_in_use: t.instances_in_use(),
                    instance_slots: t.max_instances as usize,
                })
                .collect(),
            // Registering trunks have a registration state; the others are not listed.
            trunks: trunks
                .iter()
                .filter(|(_, state)| state.registration.is_some())
                .map(|(key, state)| TrunkFigures {
                    tenant: key.tenant.clone(),
                    trunk: key.name.clone(),
                    registered: state.registered,
                })
                .collect(),
            draining: state.draining.load(std::sync::atomic::Ordering::Relaxed),
        };
        drop(trunks);
        crate::metrics::METRICS.encode(&now)
    })
    .await;
    match encoded {
        Ok(text) => ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
            .into_response(),
        Err(e) => {
            tracing::error!("encoding the metrics: {e}");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// `GET /v1/openapi.json`: the API described as OpenAPI 3.1 (no token needed).
async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// The OpenAPI 3.1 document; `tests::every_route_is_documented_and_served` keeps it and the
/// router in step.
const OPENAPI: &str = include_str!("openapi.json");

async fn list_trunks(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = authenticate(&state, &headers)?;
    let states = state.trunk_states.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let mut trunks: Vec<_> = state
        .tenants
        .get()
        .trunks()
        .filter(|trunk| caller.may_see(&trunk.tenant))
        .map(|trunk| {
            let known = states.get(&trunk.key()).cloned().unwrap_or_default();
            let registration = match trunk.register_expires {
                Some(_) => known.registration.unwrap_or_else(|| "starting".into()),
                None => "not registering".into(),
            };
            serde_json::json!({
                "tenant": trunk.tenant,
                "name": trunk.name,
                "transport": format!("{:?}", trunk.transport).to_ascii_lowercase(),
                "registration": registration,
                "keepalive": known.keepalive,
                "queued": trunk.gate.queued(),
            })
        })
        .collect();
    trunks.sort_by_key(|t| (t["tenant"].to_string(), t["name"].to_string()));
    Ok(Json(serde_json::json!({ "trunks": trunks })))
}

/// A flow as `GET /v1/flows` shows it.
fn flow_json(record: &patchbay_host::FlowRecord) -> serde_json::Value {
    serde_json::json!({
        "tenant": record.key.tenant,
        "name": record.key.flow,
        "version": record.version,
        "source": record.source,
        "deployed_at": record.deployed_at.map(crate::cdr::rfc3339),
        "live_calls": record.live.iter().map(|(version, calls)| serde_json::json!({ "version": version, "calls": calls })).collect::<Vec<_>>(),
        "swaps": record.swaps,
        "failed_deploys": record.failures,
        "last_error": record.last_error.as_ref().map(|(at, message)| serde_json::json!({ "at": crate::cdr::rfc3339(*at), "message": message })),
    })
}

/// `GET /v1/flows`: every flow the caller may see (a tenant's token: its own).
async fn list_flows(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = authenticate(&state, &headers)?;
    let flows: Vec<_> =
        state.registry.records(None).iter().filter(|r| caller.may_see(&r.key.tenant)).map(flow_json).collect();
    Ok(Json(serde_json::json!({ "flows": flows })))
}

/// The tenant a `/v1/tenants/{tenant}/…` route names, if the caller may act for it. A tenant's
/// token naming another tenant gets 403 whether or not that tenant exists.
fn named_tenant(state: &ApiState, caller: &Caller, tenant: &str) -> Result<Arc<crate::tenant::Tenant>, ApiError> {
    if !caller.may_see(tenant) {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "not your tenant"));
    }
    state
        .tenants
        .get()
        .get(tenant)
        .cloned()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "tenant-not-found", "no such tenant"))
}

/// `GET /v1/tenants/{tenant}/flows`.
async fn list_tenant_flows(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = authenticate(&state, &headers)?;
    let tenant = named_tenant(&state, &caller, &tenant)?;
    let flows: Vec<_> = state.registry.records(Some(&tenant.id)).iter().map(flow_json).collect();
    Ok(Json(serde_json::json!({ "flows": flows })))
}

/// `PUT /v1/tenants/{tenant}/flows/{name}`: the body is the component. 200 with the new version
/// once it serves new calls; 422 when it does not compile or link (the serving version stays).
async fn deploy_flow(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path((tenant, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = authenticate(&state, &headers)?;
    let tenant = named_tenant(&state, &caller, &tenant)?;
    use crate::deploy::DeployError;
    match crate::deploy::deploy(&state.engine, &state.registry, &tenant, &name, body.to_vec()).await {
        Ok(installed) => Ok(Json(serde_json::json!({
            "tenant": tenant.id,
            "name": name,
            "version": installed.flow.version(),
            "previous": installed.previous,
        }))),
        Err(e @ DeployError::BadName(_)) => Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid-name", e.to_string())),
        Err(e @ DeployError::TooLarge(_)) => {
            Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too-large", e.to_string()))
        }
        Err(e @ DeployError::Invalid(_)) => {
            Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-component", e.to_string()))
        }
        Err(e) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())),
    }
}

/// `DELETE /v1/tenants/{tenant}/flows/{name}`: new calls to it get 404; live calls finish.
async fn delete_flow(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path((tenant, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let caller = authenticate(&state, &headers)?;
    let tenant = named_tenant(&state, &caller, &tenant)?;
    if crate::deploy::remove(&state.registry, &tenant, &name).await {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(StatusCode::NOT_FOUND, "flow-not-found", format!("no flow {name:?}")))
    }
}

/// `GET /v1/tenants`: the tenants the caller may see, with their flows and use.
async fn list_tenants(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = authenticate(&state, &headers)?;
    let tenants: Vec<_> = state
        .tenants
        .get()
        .iter()
        .filter(|t| caller.may_see(&t.id))
        .map(|t| {
            let flows = state.registry.records(Some(&t.id));
            serde_json::json!({
                "id": t.id,
                "domains": t.domains,
                "flows": flows.iter().filter(|r| r.version.is_some()).count(),
                "live_calls": t.live_calls(),
                "max_calls": t.max_calls,
                "max_instances": t.max_instances,
                "trunks": t.trunks.iter().map(|trunk| trunk.name.clone()).collect::<Vec<_>>(),
                "kv_bytes": t.kv.used(),
            })
        })
        .collect();
    Ok(Json(serde_json::json!({ "tenants": tenants })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    fn state() -> Arc<ApiState> {
        let (commands, _) = mpsc::unbounded_channel();
        let engine = patchbay_host::FlowEngine::new(patchbay_host::HostConfig {
            max_instances: 1,
            ..patchbay_host::HostConfig::default()
        })
        .expect("engine");
        let engine = Arc::new(engine);
        let tenants: Arc<crate::reload::Current<Tenants>> = Arc::default();
        let resolver: Arc<dyn crate::resolve::Resolve> =
            Arc::new(crate::resolve::SystemResolver::from_system_conf().expect("resolver"));
        let reloader = crate::reload::Reloader::new(
            None,
            String::new(),
            Arc::clone(&tenants),
            Arc::clone(&engine),
            Arc::default(),
            resolver,
            crate::deploy::Watchers::new().expect("a watcher"),
        );
        Arc::new(ApiState {
            admin: None,
            reloader: Arc::new(reloader),
            tenants,
            registry: Arc::default(),
            engine,
            live: Arc::default(),
            cdr_path: None,
            originations: Arc::default(),
            commands,
            cdr: CdrSink::start(crate::cdr::CdrOutput::default()),
            trunk_states: Default::default(),
            webhook_tls: None,
            draining: Arc::default(),
            drain: Arc::default(),
        })
    }

    /// The OpenAPI document's paths and methods are exactly the router's: every documented
    /// (path, method) is served (not the fallback's 404, not 405), every other method on a
    /// documented path is 405, and every path `router()` registers is documented.
    #[tokio::test]
    async fn every_route_is_documented_and_served() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().expect("paths");
        let router = router(state());
        for (path, item) in paths {
            let concrete = path.replace("{id}", "x").replace("{tenant}", "t").replace("{name}", "n");
            for method in ["get", "post", "put", "delete", "patch"] {
                let request = axum::http::Request::builder()
                    .method(method.to_uppercase().as_str())
                    .uri(&concrete)
                    .body(axum::body::Body::empty())
                    .expect("request");
                let response = router.clone().oneshot(request).await.expect("answer");
                let status = response.status();
                let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.expect("body");
                let body = String::from_utf8_lossy(&body);
                if item.get(method).is_some() {
                    assert!(
                        status != StatusCode::METHOD_NOT_ALLOWED && !body.contains("no such endpoint"),
                        "{method} {path} is documented but not served: {status} {body}"
                    );
                } else {
                    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path} is served but not documented");
                }
            }
        }
        let source = include_str!("api.rs");
        let marker = concat!(".route", "(\"");
        for served in source.split(marker).skip(1).filter_map(|rest| rest.split('"').next()) {
            assert!(paths.contains_key(served), "{served} is routed but not in openapi.json");
        }
    }
}
