//! `patchbay flows …`: a flow author's commands against a running Patchbay's control API.
//!
//! `patchbay flows deploy FILE --tenant T --name N` sends the component with
//! `PUT /v1/tenants/T/flows/N` and prints the version now serving new calls (or the compiler's
//! or linker's refusal: the serving version stays). `patchbay flows list` prints
//! `GET /v1/flows`. The token comes from `--token` or `$PATCHBAY_TOKEN` (never a
//! positional argument that would end up in shell history unasked). Plain `http://` only:
//! the API listens on loopback or behind the operator's TLS proxy (docs/api.md).

use std::path::PathBuf;

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

/// `patchbay flows`.
#[derive(Debug, clap::Args)]
pub struct FlowsArgs {
    #[command(subcommand)]
    command: FlowsCommand,
    /// The control API's base URL.
    #[arg(long, global = true, default_value = "http://127.0.0.1:8080", env = "PATCHBAY_API")]
    api: String,
    /// Bearer token (a tenant's or the admin's).
    #[arg(long, global = true, env = "PATCHBAY_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
enum FlowsCommand {
    /// Deploy a component: it serves new calls once it compiled and linked.
    Deploy {
        /// The component (`.wasm`).
        file: PathBuf,
        /// Tenant id.
        #[arg(long)]
        tenant: String,
        /// Flow name (default: the file's name without `.wasm`).
        #[arg(long)]
        name: Option<String>,
    },
    /// List the flows the token may see, with versions and live calls.
    List,
}

/// Runs a `patchbay flows` command; true when the API accepted it.
pub async fn run(args: FlowsArgs) -> anyhow::Result<bool> {
    let token = args.token.context("no token: pass --token or set PATCHBAY_TOKEN")?;
    let (method, path, body) = match &args.command {
        FlowsCommand::Deploy { file, tenant, name } => {
            let name = match name {
                Some(name) => name.clone(),
                None => file
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .map(str::to_owned)
                    .context("--name is needed: the file name is not one")?,
            };
            let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            (hyper::Method::PUT, format!("/v1/tenants/{tenant}/flows/{name}"), bytes)
        }
        FlowsCommand::List => (hyper::Method::GET, "/v1/flows".to_owned(), Vec::new()),
    };
    let (status, answer) = request(&args.api, method, &path, &token, body).await?;
    let json: serde_json::Value = serde_json::from_slice(&answer).unwrap_or(serde_json::Value::Null);
    if !status.is_success() {
        let message = json["error"]["message"]
            .as_str()
            .map_or_else(|| String::from_utf8_lossy(&answer).into_owned(), str::to_owned);
        eprintln!("patchbay: {status}: {message}");
        return Ok(false);
    }
    match args.command {
        FlowsCommand::Deploy { .. } => {
            let version = json["version"].as_str().unwrap_or_default();
            match json["previous"].as_str() {
                Some(previous) => println!(
                    "deployed {}/{}: version {} (was {}); live calls finish on the version they started with",
                    json["tenant"].as_str().unwrap_or_default(),
                    json["name"].as_str().unwrap_or_default(),
                    crate::deploy::short(version),
                    crate::deploy::short(previous)
                ),
                None => println!(
                    "deployed {}/{}: version {}",
                    json["tenant"].as_str().unwrap_or_default(),
                    json["name"].as_str().unwrap_or_default(),
                    crate::deploy::short(version)
                ),
            }
        }
        FlowsCommand::List => {
            for flow in json["flows"].as_array().into_iter().flatten() {
                let live: Vec<String> = flow["live_calls"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| {
                        format!("{}: {}", crate::deploy::short(v["version"].as_str().unwrap_or_default()), v["calls"])
                    })
                    .collect();
                println!(
                    "{:<10} {:<12} {:<12} live [{}]{}",
                    flow["tenant"].as_str().unwrap_or_default(),
                    flow["name"].as_str().unwrap_or_default(),
                    flow["version"].as_str().map_or("-", crate::deploy::short),
                    live.join(", "),
                    flow["last_error"]["message"].as_str().map(|m| format!("  last error: {m}")).unwrap_or_default(),
                );
            }
        }
    }
    Ok(true)
}

/// One HTTP/1.1 request to the API.
async fn request(
    api: &str,
    method: hyper::Method,
    path: &str,
    token: &str,
    body: Vec<u8>,
) -> anyhow::Result<(hyper::StatusCode, Bytes)> {
    let base: hyper::Uri = api.parse().with_context(|| format!("--api {api:?}"))?;
    if base.scheme_str() != Some("http") {
        bail!("--api {api:?}: only http:// URLs");
    }
    let authority = base.authority().context("--api needs a host")?.clone();
    let port = authority.port_u16().unwrap_or(80);
    let tcp = tokio::net::TcpStream::connect((authority.host(), port))
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, authority.as_str())
        .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(hyper::header::CONTENT_TYPE, "application/wasm")
        .body(Full::new(Bytes::from(body)))?;
    let response = sender.send_request(request).await.context("sending the request")?;
    let status = response.status();
    let body = response.into_body().collect().await.context("reading the answer")?.to_bytes();
    Ok((status, body))
}
