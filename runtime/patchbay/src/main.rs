//! The `patchbay` binary: loads the configuration, compiles the tenants' flows into the flow
//! registry and serves calls.
//!
//! **Status:** SIP over UDP, TCP and TLS is served (inbound calls routed to flows by domain or
//! by a trunk's DIDs, outbound test calls with `patchbay call`) with media (RTP/SRTP, G.711,
//! DTMF, prompts, audio streams, recording), flows' `dial` (UDP legs, or through a tenant's
//! trunk over UDP/TCP/TLS, bridged) and `agent` (websocket AI agents), carrier trunks
//! ([`trunk`]: registration, outbound calls with digest and caller ID, caps) with the control
//! API ([`api`]: `POST /v1/calls`), and one CDR per call.

mod agent;
mod api;
#[cfg(feature = "bench")]
mod bench_agent;
#[cfg(feature = "bench")]
mod bench_media;
mod call;
mod caller;
mod cdr;
mod config;
mod deploy;
mod dial;
mod endpoint;
mod flows_cli;
mod media;
mod metrics;
mod originate;
mod policy;
mod prompts;
mod random;
mod recording;
mod reload;
mod resolve;
mod tenant;
mod transport;
mod trunk;
mod webhook;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use patchbay_host::{FlowEngine, FlowRegistry, HostConfig};

use crate::config::{Config, parse_listen};
use toml::Spanned;

/// Patchbay: a programmable voice runtime. Call flows are WebAssembly components.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start Patchbay (without --config: the embedded default, loopback only, stock flows).
    Run {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Load the configuration and compile every flow, report, and exit (non-zero on any error).
    Check {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print the embedded default configuration (a starting point for your own).
    DefaultConfig,
    /// Place a test call: dial a SIP URI, wait, hang up, report (exit 0 when it was answered).
    Call(Box<caller::CallArgs>),
    /// Deploy and list flows on a running Patchbay (through its control API).
    Flows(flows_cli::FlowsArgs),
    /// Benchmark: latency added between callers' RTP and AI agents' websockets (see BENCHMARKS.md).
    #[cfg(feature = "bench")]
    #[command(hide = true)]
    BenchAgent {
        /// Concurrent agent calls.
        #[arg(long, default_value_t = 500)]
        calls: usize,
        /// Seconds to measure.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Use this echo agent (`ws://…`, e.g. from `patchbay echo-agent`) instead of one in
        /// this process.
        #[arg(long)]
        agent: Option<String>,
        /// Run the agent sessions in tokio tasks (the path `wss://` agents take) instead of on
        /// the media clock, for comparison.
        #[arg(long)]
        task_path: bool,
    },
    /// Benchmark helper: serve the echo agent (returns every media payload at once).
    #[cfg(feature = "bench")]
    #[command(hide = true)]
    EchoAgent {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8766")]
        listen: std::net::SocketAddr,
    },
    /// Benchmark: pacing of the shared media clock with many calls (see BENCHMARKS.md).
    #[cfg(feature = "bench")]
    #[command(hide = true)]
    BenchMedia {
        /// Concurrent media streams.
        #[arg(long, default_value_t = 2000)]
        calls: usize,
        /// Seconds to measure.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = match &cli.command {
        Command::Run { config } | Command::Check { config } => config::log_settings(config.as_deref()),
        _ => config::LogConfig::default(),
    };
    init_log(log.format);
    let result = match cli.command {
        Command::DefaultConfig => {
            print!("{}", config::DEFAULT);
            Ok(true)
        }
        Command::Check { config } => run(config, false),
        Command::Run { config } => run(config, true),
        #[cfg(feature = "bench")]
        Command::BenchAgent { calls, seconds, agent, task_path } => {
            bench_agent::run(calls, seconds, agent, !task_path).map(|()| true)
        }
        #[cfg(feature = "bench")]
        Command::EchoAgent { listen } => bench_agent::serve_echo(listen).map(|()| true),
        #[cfg(feature = "bench")]
        Command::BenchMedia { calls, seconds } => bench_media::run(calls, seconds).map(|()| true),
        Command::Flows(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting tokio")
            .and_then(|runtime| runtime.block_on(flows_cli::run(args))),
        Command::Call(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting tokio")
            .and_then(|runtime| runtime.block_on(caller::call(*args))),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("patchbay: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The log: to stderr, filtered by `RUST_LOG` (default `info`); plain lines (coloured only
/// when stderr is a terminal, so a file or journald gets no escape codes) or JSON objects, one
/// per line, each with the fields of the spans it is in (a flow's lines: the call's tenant,
/// flow and Call-ID).
fn init_log(format: config::LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        config::LogFormat::Plain => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        config::LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).init(),
    }
}

/// Loads everything; with `serve`, waits for a shutdown signal. Returns whether every flow loaded.
fn run(config_path: Option<PathBuf>, serve: bool) -> anyhow::Result<bool> {
    let config = match &config_path {
        Some(path) => Config::load(path)?,
        None => Config::embedded()?,
    };
    if serve {
        media::raise_fd_limit();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    runtime.block_on(async move {
        let host = HostConfig {
            max_instances: config.flows.max_instances,
            max_memory_bytes: (config.flows.max_memory_mb as usize) << 20,
            cache_dir: config.flows.cache_dir.clone().or_else(patchbay_host::default_cache_dir),
            ..HostConfig::default()
        };
        let engine = Arc::new(FlowEngine::new(host).context("starting the flow engine")?);
        let registry = Arc::new(FlowRegistry::new());
        let resolver: Arc<dyn resolve::Resolve> =
            Arc::new(resolve::SystemResolver::from_system_conf().context("reading the DNS configuration")?);
        let tenants = Arc::new(tenant::Tenants::build(&config, &resolver)?);
        let all_loaded = deploy::load_all(&config, &tenants, &engine, &registry).await;
        // The CDR webhook is checked by `check` too (what `run` would refuse, `check` must).
        let cdr_hook = match &config.cdr.webhook {
            Some(url) => Some(webhook::Webhook::for_cdrs(url.get_ref(), config.cdr.webhook_secret.clone())?),
            None => None,
        };
        report(&config, &engine, &registry);
        if serve {
            let watchers = deploy::Watchers::start(&tenants, &engine, &registry)?;
            let current = Arc::new(reload::Current::new(Arc::clone(&tenants)));
            // What a reload compares against: the text the running configuration came from.
            let text = match &config_path {
                Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
                None => config::DEFAULT.to_owned(),
            };
            let reloader = Arc::new(reload::Reloader::new(
                config_path.clone(),
                text,
                Arc::clone(&current),
                Arc::clone(&engine),
                Arc::clone(&registry),
                Arc::clone(&resolver),
                watchers,
            ));
            let trunk_states = trunk::TrunkStates::default();
            let originations = Arc::new(originate::Originations::default());
            let live = Arc::new(call::LiveCalls::default());
            let routing = Arc::new(endpoint::Routing {
                tenants: Arc::clone(&current),
                originations: Arc::clone(&originations),
                live: Arc::clone(&live),
                trunk_states: Arc::clone(&trunk_states),
                external_ip: config.sip.external_ip,
                max_server_transactions: config.sip.max_server_transactions,
                pending: call::PendingCalls::new(config.sip.max_pending_calls),
                draining: Arc::default(),
                media: media::MediaEngine::start().context("starting the media clock")?,
                rtp_bind: config.media.rtp_bind.unwrap_or_else(|| {
                    config
                        .sip
                        .listen
                        .iter()
                        .find_map(|l| parse_listen(l.get_ref()).ok())
                        .map_or(std::net::IpAddr::from([127, 0, 0, 1]), |l| l.addr.ip())
                }),
                rtp_timeout: (config.media.rtp_timeout_secs > 0)
                    .then(|| Duration::from_secs(config.media.rtp_timeout_secs)),
                srtp: config.media.srtp,
                srtp_over_plain: config.media.srtp_over_plain,
                ptime_ms: config.media.ptime_ms,
                cdr: cdr::CdrSink::start(cdr::CdrOutput {
                    path: config.cdr.path.as_ref().map(|p| config.base_dir.join(p)),
                    rotate_bytes: config.cdr.rotate_kb.saturating_mul(1024),
                    rotate_every: (config.cdr.rotate_hours > 0)
                        .then(|| Duration::from_secs(config.cdr.rotate_hours.saturating_mul(3600))),
                    tap: cdr_hook.map(webhook::deliver_cdrs),
                }),
                storage: match &config.storage.dir {
                    Some(dir) => config.base_dir.join(dir),
                    None => default_storage_dir(),
                },
                sip_trace: endpoint::SipTrace::new(config.log.sip_trace, config.log.sip_trace_sources.clone()),
            });
            let (inbound, inbound_rx) = tokio::sync::mpsc::channel(config.sip.queue_depth);
            let streams = transport::Streams::new(
                transport::StreamSettings {
                    limits: patchbay_sip::message::Limits::default(),
                    idle_timeout: (config.sip.tcp_idle_timeout_secs > 0)
                        .then(|| Duration::from_secs(config.sip.tcp_idle_timeout_secs)),
                    max_connections: config.sip.max_connections,
                    max_connections_per_source: config.sip.max_connections_per_source,
                    message_deadline: transport::MESSAGE_DEADLINE,
                    max_messages_per_source: config.sip.max_messages_per_source,
                },
                inbound.clone(),
            );
            let mut outbound = transport::Outbound::default().with_streams(Arc::clone(&streams));
            // Where we listen, per transport; the first is the default Contact.
            let mut listeners: Vec<(patchbay_sip::transaction::Transport, std::net::SocketAddr)> = Vec::new();
            for listen in config.sip.listen.iter().filter_map(|l| parse_listen(l.get_ref()).ok()) {
                let name = format!("{}:{}", listen.transport, listen.addr);
                if listen.transport == "udp" {
                    let socket =
                        tokio::net::UdpSocket::bind(listen.addr).await.with_context(|| format!("binding {name}"))?;
                    let socket = Arc::new(socket);
                    listeners.push((
                        patchbay_sip::transaction::Transport::Udp,
                        socket.local_addr().context("udp local address")?,
                    ));
                    outbound = outbound.with_udp(Arc::clone(&socket));
                    tokio::spawn(transport::udp_receiver(socket, inbound.clone(), config.sip.max_messages_per_source));
                    continue;
                }
                let listener =
                    tokio::net::TcpListener::bind(listen.addr).await.with_context(|| format!("binding {name}"))?;
                let transport = if listen.transport == "tls" {
                    patchbay_sip::transaction::Transport::Tls
                } else {
                    patchbay_sip::transaction::Transport::Tcp
                };
                listeners.push((transport, listener.local_addr().with_context(|| format!("{name} local address"))?));
                if listen.transport == "tls" {
                    // Config::parse refuses a tls: listener without a loaded [sip.tls].
                    let server = config.sip.tls.as_ref().and_then(|t| t.server.clone()).context("[sip.tls] missing")?;
                    let acceptor = tokio_rustls::TlsAcceptor::from(server);
                    tokio::spawn(transport::tls_listener(listener, acceptor, Arc::clone(&streams)));
                } else {
                    tokio::spawn(transport::tcp_listener(listener, Arc::clone(&streams)));
                }
            }
            if let Some(listen) = config.demo_agent.listen {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("binding the demo agent on {listen}"))?;
                let greeting = prompts::stock_ulaw("agent-greeting.wav").context("the demo agent's greeting")?;
                let agent = patchbay_agent::server::DemoAgent::new(patchbay_agent::server::DemoAgentConfig {
                    greeting,
                    transfer_target: config.demo_agent.transfer_to.clone(),
                    ..Default::default()
                });
                println!(
                    "demo AI agent on ws://{listen}/agent (greets, repeats what you say; 0 transfers, # hangs up)"
                );
                tokio::spawn(agent.serve(listener));
            }
            let cdrs = routing.cdr.clone();
            let (commands, command_rx) = tokio::sync::mpsc::unbounded_channel();
            let drain_commands = commands.clone();
            let drain_asked = Arc::new(tokio::sync::Notify::new());
            let drain_timeout = Duration::from_secs(config.sip.drain_timeout_secs);
            // Each trunk's gate releases its queued originations; a tenant's cap on calls up at
            // once is shared by its trunks.
            for tenant in tenants.iter() {
                for trunk in &tenant.trunks {
                    tokio::spawn(Arc::clone(&trunk.gate).run(tenant.caps.clone()));
                    let started =
                        Arc::clone(trunk).start(Arc::clone(&streams), commands.clone(), Arc::clone(&trunk_states));
                    tokio::spawn(started);
                }
            }
            if let Some(api) = &config.api {
                let listener = tokio::net::TcpListener::bind(api.listen)
                    .await
                    .with_context(|| format!("binding the control API on {}", api.listen))?;
                let state = Arc::new(api::ApiState {
                    admin: api.admin_token.as_ref().map(|t| tenant::token_digest(t.expose())),
                    tenants: Arc::clone(&current),
                    reloader: Arc::clone(&reloader),
                    registry: Arc::clone(&registry),
                    engine: Arc::clone(&engine),
                    live,
                    cdr_path: config.cdr.path.as_ref().map(|p| config.base_dir.join(p)),
                    originations,
                    commands: commands.clone(),
                    cdr: routing.cdr.clone(),
                    trunk_states,
                    webhook_tls: transport::tls_client_config(None).ok(),
                    draining: Arc::clone(&routing.draining),
                    drain: Arc::clone(&drain_asked),
                });
                tokio::spawn(api::serve(listener, state));
            }
            let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel();
            tokio::spawn(sweep_recordings(Arc::clone(&routing.tenants), routing.storage.clone()));
            if !listeners.is_empty() {
                let endpoint = endpoint::run_endpoint(
                    listeners,
                    inbound_rx,
                    outbound,
                    engine,
                    registry,
                    routing,
                    endpoint::EndpointControl { commands, command_rx, shutdown: shutdown_rx },
                );
                tokio::spawn(endpoint);
            }
            let mut signals = Signals::install();
            println!("Press Ctrl-C to stop.");
            signals.stop(&reloader, &drain_asked).await;
            // Drain: no new calls; the calls up end by themselves, until the deadline or a
            // second signal (docs/operations.md).
            let (done, drained) = tokio::sync::oneshot::channel();
            if drain_commands.send(endpoint::Command::Drain { done }).is_ok() {
                tracing::info!(
                    deadline_secs = drain_timeout.as_secs(),
                    "draining: new calls get 503; a second SIGTERM ends the calls up now"
                );
                let never = tokio::sync::Notify::new();
                tokio::select! {
                    _ = drained => {}
                    () = tokio::time::sleep(drain_timeout) => tracing::warn!("drain deadline reached: ending the calls still up"),
                    () = signals.stop(&reloader, &never) => tracing::info!("second signal: ending the calls up now"),
                }
            }
            tracing::info!("shutting down");
            // Hang up every call and let their records be written before exiting.
            let (done, all_ended) = tokio::sync::oneshot::channel();
            if shutdown.send(done).is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(5), all_ended).await;
            }
            // The records are written (and, with a CDR webhook, delivered: up to 10 s more for
            // it; what is still queued then is only in the file, see docs/calls.md).
            let wait = if config.cdr.webhook.is_some() { 12 } else { 2 };
            if tokio::time::timeout(Duration::from_secs(wait), cdrs.flush()).await.is_err() {
                tracing::warn!("exiting before every record was written or delivered");
            }
        }
        Ok(all_loaded)
    })
}

fn report(config: &Config, engine: &FlowEngine, registry: &FlowRegistry) {
    println!("Patchbay {}", env!("CARGO_PKG_VERSION"));
    println!(
        "flow engine: {} instance slots ({} allocator), up to {} MiB per flow",
        engine.config().max_instances,
        if engine.pooling() { "pooling" } else { "on-demand" },
        engine.config().max_memory_bytes >> 20
    );
    let listeners: Vec<_> = config.sip.listen.iter().filter_map(|l| parse_listen(l.get_ref()).ok()).collect();
    let port = listeners.first().map(|l| l.addr.port()).unwrap_or(5060);
    for (key, flow) in registry.list() {
        let tenant = config.tenants.iter().find(|t| t.id == key.tenant);
        let domain = tenant.and_then(|t| t.domains.first()).map_or("127.0.0.1", String::as_str);
        let limits = tenant.map(tenant::limits_of).unwrap_or_default();
        println!(
            "  tenant {:<8} flow {:<8} version {}  ->  sip:{}@{}:{}  (memory {} MiB, cpu budget {:?})",
            key.tenant,
            key.flow,
            &flow.version()[..12],
            key.flow,
            domain,
            port,
            limits.memory_bytes >> 20,
            limits.cpu_budget
        );
    }
    if let Some(ip) = config.sip.external_ip {
        println!("external address for SDP and Contact: {ip}");
    }
    let served: Vec<_> = listeners.iter().map(|l| format!("{}:{}", l.transport, l.addr)).collect();
    println!("SIP on {}.", served.join(", "));
    for tenant in &config.tenants {
        for trunk in tenant.trunks.iter().map(Spanned::get_ref) {
            println!(
                "  tenant {:<8} trunk {:<8} {} over {}{}{}",
                tenant.id,
                trunk.name,
                trunk.gateway.get_ref(),
                format!("{:?}", trunk.transport).to_lowercase(),
                if trunk.register { ", registering" } else { "" },
                if trunk.dids.is_empty() { String::new() } else { format!(", {} DIDs", trunk.dids.len()) },
            );
        }
    }
    if let Some(api) = &config.api {
        println!("control API on http://{}/v1/ (see docs/api.md)", api.listen);
        println!(
            "metrics on http://{0}/metrics, health checks on http://{0}/healthz and /readyz (see docs/operations.md)",
            api.listen
        );
    }
    println!(
        "Media: G.711 (PCMU/PCMA) over RTP or SRTP (SDES), RFC 4733 / in-band / SIP INFO DTMF, prompts, recording, \
         dial + bridge (UDP), AI agents over websockets (Twilio Media Streams), paced on one clock."
    );
    let flows = registry.list();
    let first = flows.iter().find(|(key, _)| key.flow == "echo").or(flows.first()).map(|(key, _)| key.clone());
    let domain = first
        .as_ref()
        .and_then(|key| config.tenants.iter().find(|t| t.id == key.tenant))
        .and_then(|t| t.domains.first().cloned());
    let flow = first.map_or_else(|| "echo".to_owned(), |key| key.flow);
    match domain.as_deref() {
        None | Some("127.0.0.1") => println!(
            "Try: sipp -sn uac -s {flow} 127.0.0.1:{port} -m 1   (or point a softphone at sip:{flow}@127.0.0.1:{port})"
        ),
        Some(domain) => println!("Try: patchbay call sip:{flow}@{domain} --proxy 127.0.0.1:{port}"),
    }
}

/// Deletes recordings past their tenant's `recordings_retention_days`, at start and every hour
/// after (off the async workers: a tenant may have many files).
async fn sweep_recordings(tenants: Arc<reload::Current<tenant::Tenants>>, storage: PathBuf) {
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    loop {
        every.tick().await;
        let kept: Vec<(String, Duration)> =
            tenants.get().iter().filter_map(|t| Some((t.id.clone(), t.recordings_retention?))).collect();
        let storage = storage.clone();
        let swept = tokio::task::spawn_blocking(move || {
            for (tenant, retention) in kept {
                let dir = recording::dir(&storage, &tenant);
                let cutoff = std::time::SystemTime::now() - retention;
                match recording::sweep(&dir, cutoff) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(%tenant, files = n, "recordings past their retention deleted"),
                    Err(e) => tracing::warn!(%tenant, dir = %dir.display(), "sweeping old recordings: {e}"),
                }
            }
        });
        if let Err(e) = swept.await {
            tracing::warn!("sweeping old recordings: {e}");
        }
    }
}

/// Default storage directory: `$XDG_DATA_HOME/patchbay` or `~/.local/share/patchbay`.
fn default_storage_dir() -> PathBuf {
    match (std::env::var_os("XDG_DATA_HOME"), std::env::var_os("HOME")) {
        (Some(data), _) if !data.is_empty() => PathBuf::from(data).join("patchbay"),
        (_, Some(home)) => PathBuf::from(home).join(".local/share/patchbay"),
        _ => PathBuf::from("patchbay-data"),
    }
}

/// The signals that stop the process (SIGTERM, SIGINT) and reload it (SIGHUP).
struct Signals {
    terminate: Option<tokio::signal::unix::Signal>,
    interrupt: Option<tokio::signal::unix::Signal>,
    hangup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Installed before saying we are ready: a SIGTERM (or SIGHUP) sent as soon as the line
    /// appears must find them (the default action would kill the process).
    fn install() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        let watch = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(signal) => Some(signal),
            Err(e) => {
                tracing::warn!("cannot watch {name}: {e}");
                None
            }
        };
        Self {
            terminate: watch(SignalKind::terminate(), "SIGTERM"),
            interrupt: watch(SignalKind::interrupt(), "SIGINT"),
            hangup: watch(SignalKind::hangup(), "SIGHUP"),
        }
    }

    /// Waits for SIGTERM or SIGINT, or for `asked` (the API's drain), reloading on SIGHUP
    /// meanwhile (all or nothing, docs/tenants.md).
    async fn stop(&mut self, reloader: &reload::Reloader, asked: &tokio::sync::Notify) {
        async fn next(signal: &mut Option<tokio::signal::unix::Signal>) {
            match signal.as_mut() {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        loop {
            tokio::select! {
                () = next(&mut self.terminate) => return,
                () = next(&mut self.interrupt) => return,
                () = asked.notified() => return,
                () = next(&mut self.hangup) => {
                    if let Err(e) = reloader.reload().await {
                        tracing::error!("reload refused, the running configuration stays: {e}");
                    }
                }
            }
        }
    }
}
