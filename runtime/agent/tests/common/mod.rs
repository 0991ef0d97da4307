//! Helpers shared by the agent crate's integration tests: a scripted agent on 127.0.0.1 and
//! what it observes.

// Each test file uses its own part of these.
#![allow(dead_code)]

use std::time::Duration;

use patchbay_agent::StartInfo;
use patchbay_agent::server::{Observed, ScriptStep, ScriptedAgent};
use tokio::net::TcpListener;
use tokio::sync::mpsc::UnboundedReceiver;

/// How long a test waits for anything the agent or the stream should do.
pub const WAIT: Duration = Duration::from_secs(5);

pub fn start_info() -> StartInfo {
    StartInfo {
        account_sid: "ACtenant1".into(),
        call_sid: "CAcall1".into(),
        stream_sid: "MZstream1".into(),
        custom_parameters: vec![("tenant".into(), "acme".into()), ("lang".into(), "en-GB".into())],
    }
}

pub async fn listener() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://{}/agent", listener.local_addr().expect("addr"));
    (listener, url)
}

/// Starts a scripted agent; returns its URL and what it observes.
pub async fn scripted(script: Vec<ScriptStep>) -> (String, UnboundedReceiver<Observed>) {
    let (listener, url) = listener().await;
    let (agent, observed) = ScriptedAgent::new(script);
    tokio::spawn(agent.serve(listener));
    (url, observed)
}

pub async fn observe(observed: &mut UnboundedReceiver<Observed>) -> Observed {
    tokio::time::timeout(WAIT, observed.recv()).await.expect("agent observation in time").expect("agent channel open")
}

/// The JSON of the next message the agent receives.
pub async fn received_json(observed: &mut UnboundedReceiver<Observed>) -> serde_json::Value {
    match observe(observed).await {
        Observed::Received { json, .. } => json,
        other => panic!("expected a message, got {other:?}"),
    }
}
