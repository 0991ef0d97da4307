//! Many tenants on one host: hot swap of a flow under load (sipp, 200 calls up at once, the
//! component replaced every 1.5 s by alternating two builds, a broken one written in the
//! middle), and what one tenant's token can and cannot reach in the control API.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use patchbay_e2e::{Patchbay, free_port, http, launch};

const ADMIN: &str = "admin-token";

/// Two tenants on 127.0.0.1's two names: `acme` (domain 127.0.0.1, flows from `acme-flows/`)
/// and `globex` (domain localhost, flows from `globex-flows/`), CDRs in `cdr.jsonl`, the API on
/// its own port. Returns Patchbay and the API's port.
fn start_two_tenants(acme_echo: &[u8]) -> (Patchbay, u16) {
    let dir = tempfile::tempdir().expect("tempdir");
    for tenant in ["acme", "globex"] {
        std::fs::create_dir(dir.path().join(format!("{tenant}-flows"))).expect("flows dir");
    }
    std::fs::write(dir.path().join("acme-flows/echo.wasm"), acme_echo).expect("acme echo");
    std::fs::write(dir.path().join("globex-flows/echo.wasm"), patchbay_stock_flows::ECHO.component)
        .expect("globex echo");
    let (port, api) = (free_port(), free_port());
    let config = format!(
        "[sip]\nlisten = [\"udp:127.0.0.1:{port}\"]\n\
         [media]\nrtp_timeout_secs = 0\n\
         [cdr]\npath = \"cdr.jsonl\"\n\
         [api]\nlisten = \"127.0.0.1:{api}\"\nadmin_token = \"{ADMIN}\"\n\
         [[tenant]]\nid = \"acme\"\ndomains = [\"127.0.0.1\"]\napi_token = \"acme-token\"\nflows_dir = \"acme-flows\"\n\
         [[tenant]]\nid = \"globex\"\ndomains = [\"localhost\"]\napi_token = \"globex-token\"\nflows_dir = \"globex-flows\"\n"
    );
    (launch(dir, port, &config), api)
}

/// The echo component with a custom section appended: another build (another SHA-256) that
/// behaves the same, as a rebuild with a changed constant or timestamp would be.
fn another_build(component: &[u8], tag: &str) -> Vec<u8> {
    let name = b"patchbay-test-build";
    let mut payload = vec![name.len() as u8];
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());
    let mut bytes = component.to_vec();
    bytes.push(0); // custom section
    bytes.push(payload.len() as u8); // LEB128, < 128
    bytes.extend_from_slice(&payload);
    bytes
}

fn sha256_hex(bytes: &[u8]) -> String {
    // Through the binary's own notion of a version: the API reports it after a deploy. Here
    // a small independent implementation would be a second source of truth, so the test asks
    // `sha256sum` (coreutils).
    let mut child = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("sha256sum");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), bytes).expect("write");
    let out = child.wait_with_output().expect("sha256sum output");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_owned()
}

/// Milliseconds since the epoch of a CDR time (`2026-12-06T23:37:52.820Z`).
fn epoch_ms(rfc3339: &str) -> i64 {
    let at = humantime::parse_rfc3339(rfc3339).expect("a CDR time");
    at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Writes `bytes` as `dir/echo.wasm` the way a deploy job should: a temporary name in the same
/// directory, then a rename.
fn install(dir: &std::path::Path, bytes: &[u8]) {
    let tmp = dir.join(".echo.wasm.tmp");
    std::fs::write(&tmp, bytes).expect("write the new build");
    std::fs::rename(&tmp, dir.join("echo.wasm")).expect("move it into place");
}

#[test]
fn hot_swap_under_load_keeps_every_call_on_its_version() {
    let build_a = patchbay_stock_flows::ECHO.component.to_vec();
    let build_b = another_build(&build_a, "b");
    let (version_a, version_b) = (sha256_hex(&build_a), sha256_hex(&build_b));
    assert_ne!(version_a, version_b);
    let (pb, api) = start_two_tenants(&build_a);
    let flows = pb.dir.path().join("acme-flows");

    // 600 calls, 100 a second, each up for 4 s: 200 up at once from the fourth second on.
    const CALLS: u32 = 600;
    let sipp_dir = tempfile::tempdir().expect("tempdir");
    let sipp = Command::new("sipp")
        .current_dir(sipp_dir.path())
        .args(["-sn", "uac", "-s", "echo", "-i", "127.0.0.1", "-p", &free_port().to_string()])
        .args(["-m", &CALLS.to_string(), "-r", "100", "-l", "200", "-d", "4000"])
        .args(["-timeout", "90", "-timeout_error", "-nostdin", "-trace_err"])
        .arg(format!("127.0.0.1:{}", pb.port))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sipp (Debian package sip-tester; `cargo xtask test` installs it)");

    // While it runs: swap every 1.5 s, alternating the two builds, with a broken component
    // (half of a build, as a copy cut short would leave) written once in the middle.
    let mut swaps: Vec<(i64, String)> = vec![(0, version_a.clone())];
    let started = Instant::now();
    let mut round = 0;
    while started.elapsed() < Duration::from_secs(9) {
        std::thread::sleep(Duration::from_millis(1500));
        round += 1;
        if round == 3 {
            std::fs::write(flows.join("echo.wasm"), &build_a[..build_a.len() / 2]).expect("write a broken build");
            continue;
        }
        let (bytes, version) = if round % 2 == 1 { (&build_b, &version_b) } else { (&build_a, &version_a) };
        install(&flows, bytes);
        swaps.push((now_ms(), version.clone()));
    }
    let out = sipp.wait_with_output().expect("sipp finished");
    let mut log = String::from_utf8_lossy(&out.stderr).into_owned();
    for entry in std::fs::read_dir(sipp_dir.path()).into_iter().flatten().flatten() {
        if entry.path().to_string_lossy().ends_with("_errors.log") {
            log.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
        }
    }
    assert!(out.status.success(), "sipp saw failed calls during the swaps:\n{log}");

    let cdrs = pb.wait_for_cdrs(CALLS as usize, Duration::from_secs(20));
    assert_eq!(cdrs.len(), CALLS as usize, "one record per call");
    let mut on_new = 0;
    for cdr in &cdrs {
        let version = cdr["flow_version"].as_str().expect("flow_version");
        assert!(version == version_a || version == version_b, "a call ran {version}: {cdr}");
        assert_eq!(cdr["end_cause"], "caller-hangup", "{cdr}");
        let start = epoch_ms(cdr["start"].as_str().expect("start"));
        // The build current when the call started: the last one written before it; within a
        // second of a write the swap may still be under way, so the one before is also right.
        let at = swaps.iter().rposition(|(written, _)| *written <= start).unwrap_or(0);
        let (written, expected) = &swaps[at];
        if *written > 0 && start - written > 1000 {
            assert_eq!(
                version,
                expected,
                "a call started {} ms after a swap ran the old build: {cdr}",
                start - written
            );
            on_new += 1;
        } else {
            let before = &swaps[at.saturating_sub(1)].1;
            assert!(version == expected || version == before, "{cdr}");
        }
    }
    assert!(on_new > 100, "only {on_new} calls started well after a swap: the test did not exercise it");

    // The broken build was refused and counted; the flow ends on the last good build, and the
    // versions retired during the run were freed with their last calls.
    let (status, _, listing) = http("GET", api, "/v1/tenants/acme/flows", ADMIN, None);
    assert_eq!(status, 200, "{listing}");
    let echo = &listing["flows"][0];
    assert_eq!(echo["name"], "echo", "{listing}");
    assert_eq!(echo["version"].as_str(), swaps.last().map(|(_, v)| v.as_str()), "{listing}");
    assert!(echo["failed_deploys"].as_u64() >= Some(1), "{listing}");
    assert!(echo["last_error"]["message"].as_str().is_some_and(|m| m.contains("compile")), "{listing}");
    let live = echo["live_calls"].as_array().expect("live_calls");
    assert_eq!(live.len(), 1, "old versions still held after every call ended: {listing}");
    assert_eq!(live[0]["calls"], 0, "{listing}");
}

#[test]
fn a_tenant_token_reaches_only_its_own_tenant() {
    let (pb, api) = start_two_tenants(patchbay_stock_flows::ECHO.component);
    // Each token sees its own flows only, on every listing route.
    for (token, own, other) in [("acme-token", "acme", "globex"), ("globex-token", "globex", "acme")] {
        let (status, _, flows) = http("GET", api, "/v1/flows", token, None);
        assert_eq!(status, 200);
        let tenants: Vec<_> = flows["flows"].as_array().expect("flows").iter().map(|f| f["tenant"].clone()).collect();
        assert_eq!(tenants, vec![serde_json::json!(own)], "{flows}");
        let (status, _, listing) = http("GET", api, "/v1/tenants", token, None);
        assert_eq!(status, 200);
        let ids: Vec<_> = listing["tenants"].as_array().expect("tenants").iter().map(|t| t["id"].clone()).collect();
        assert_eq!(ids, vec![serde_json::json!(own)], "{listing}");
        let (status, _, _) = http("GET", api, &format!("/v1/tenants/{own}/flows"), token, None);
        assert_eq!(status, 200);
        // Every route naming the other tenant is refused without data.
        for (method, path, body) in [
            ("GET", format!("/v1/tenants/{other}/flows"), None),
            ("PUT", format!("/v1/tenants/{other}/flows/echo"), Some("not a component")),
            ("DELETE", format!("/v1/tenants/{other}/flows/echo"), None),
            ("PUT", "/v1/tenants/nobody/flows/echo".to_owned(), Some("x")),
        ] {
            let (status, _, answer) = http(method, api, &path, token, body);
            assert_eq!(status, 403, "{method} {path} with {own}'s token: {answer}");
            assert_eq!(answer["error"]["code"], "forbidden", "{answer}");
        }
        let call = format!(r#"{{"to":"+15551234567","flow":"echo","tenant":"{other}"}}"#);
        let (status, _, answer) = http("POST", api, "/v1/calls", token, Some(&call));
        assert_eq!(status, 403, "{answer}");
    }
    // The other tenant's flow still serves after the refused attempts.
    let (status, _, flows) = http("GET", api, "/v1/flows", ADMIN, None);
    assert_eq!(status, 200);
    assert_eq!(flows["flows"].as_array().map(Vec::len), Some(2), "{flows}");
    for flow in flows["flows"].as_array().into_iter().flatten() {
        assert_eq!(flow["failed_deploys"], 0, "{flow}");
    }
    // No token, a wrong one: 401.
    let (status, _, _) = http("GET", api, "/v1/flows", "wrong", None);
    assert_eq!(status, 401);
    drop(pb);
}

/// `patchbay flows deploy FILE --tenant acme --name echo` against the API on `api`: whether it
/// succeeded, and what it printed.
fn deploy_cli(pb: &Patchbay, api: u16, file: &std::path::Path) -> (bool, String) {
    let out = patchbay_e2e::patchbay(pb.dir.path())
        .args(["flows", "deploy"])
        .arg(file)
        .args(["--tenant", "acme", "--name", "echo", "--api", &format!("http://127.0.0.1:{api}")])
        .env("PATCHBAY_TOKEN", "acme-token")
        .output()
        .expect("patchbay flows deploy");
    let said = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said)
}

#[test]
fn a_deploy_through_the_api_serves_new_calls_and_a_broken_one_is_refused() {
    let (pb, api) = start_two_tenants(patchbay_stock_flows::ECHO.component);
    let build_b = another_build(patchbay_stock_flows::ECHO.component, "api");
    let version_b = sha256_hex(&build_b);
    // `patchbay flows deploy`, the CLI a flow author uses.
    let file = pb.dir.path().join("build-b.wasm");
    std::fs::write(&file, &build_b).expect("write build");
    let (ok, said) = deploy_cli(&pb, api, &file);
    assert!(ok, "{said}");
    assert!(said.contains(&version_b[..12]), "{said}");
    // Saved in the tenant's directory, so a restart keeps it.
    let saved = std::fs::read(pb.dir.path().join("acme-flows/echo.wasm")).expect("saved component");
    assert_eq!(saved, build_b);
    // A broken component through the CLI: refused with the compiler's reason, exit 1, and the
    // deployed version keeps serving.
    std::fs::write(&file, b"\0asm\x0d\0\x01\0garbage").expect("write broken");
    let (ok, said) = deploy_cli(&pb, api, &file);
    assert!(!ok, "{said}");
    assert!(said.contains("422"), "{said}");
    let (_, _, listing) = http("GET", api, "/v1/tenants/acme/flows", "acme-token", None);
    assert_eq!(listing["flows"][0]["version"].as_str(), Some(version_b.as_str()), "{listing}");
    assert_eq!(listing["flows"][0]["source"], "api", "{listing}");
    // A new call runs the deployed build.
    let (ok, log) = patchbay_e2e::run_sipp(pb.port, "echo", &["-sn", "uac"], 1, &["-d", "200"]);
    assert!(ok, "{log}");
    let cdrs = pb.wait_for_cdrs(1, Duration::from_secs(10));
    assert_eq!(cdrs[0]["flow_version"].as_str(), Some(version_b.as_str()), "{cdrs:?}");
    assert_eq!(cdrs[0]["tenant"], "acme");
    // Removing it: new calls get 404 (and a record with cause no-route).
    let (status, _, _) = http("DELETE", api, "/v1/tenants/acme/flows/echo", "acme-token", None);
    assert_eq!(status, 204);
    assert!(!pb.dir.path().join("acme-flows/echo.wasm").exists());
    let (ok, _) = patchbay_e2e::run_sipp(pb.port, "echo", &["-sn", "uac"], 1, &["-d", "200"]);
    assert!(!ok, "a call to a removed flow was answered");
    let cdrs = pb.wait_for_cdrs(2, Duration::from_secs(10));
    assert_eq!(cdrs.last().map(|c| c["end_cause"].clone()), Some(serde_json::json!("no-route")), "{cdrs:?}");
}

#[test]
fn the_example_config_serves_both_tenants() {
    // examples/tenants.toml as shipped, on free ports (the shipped ones may be taken here).
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let shipped = std::fs::read_to_string(root.join("examples/tenants.toml")).expect("examples/tenants.toml");
    let (port, api) = (free_port(), free_port());
    let config = shipped
        .replace("127.0.0.1:5060", &format!("127.0.0.1:{port}"))
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{api}"))
        .replace("\"tenants/", &format!("\"{}/", root.join("examples/tenants").display()));
    assert!(config.contains("acme.test") && config.contains("globex.test"));
    let pb = launch(tempfile::tempdir().expect("tempdir"), port, &config);
    for (domain, token) in [("acme.test", "acme-token"), ("globex.test", "globex-token")] {
        let (status, _, flows) = http("GET", api, "/v1/flows", token, None);
        assert_eq!(status, 200, "{flows}");
        assert!(flows["flows"].as_array().is_some_and(|f| f.iter().any(|f| f["name"] == "echo")), "{flows}");
        // Routed by the request-URI's domain, sent to Patchbay's address.
        let uri = format!("sip:echo@{domain}");
        let proxy = format!("127.0.0.1:{port}");
        let (ok, said) =
            patchbay_e2e::patchbay_call(pb.dir.path(), &[uri.as_str(), "--proxy", &proxy, "--hangup-after", "0.5"]);
        assert!(ok, "{uri}: {said}");
    }
    // A domain no tenant serves is not answered.
    let proxy = format!("127.0.0.1:{port}");
    let (ok, _) = patchbay_e2e::patchbay_call(pb.dir.path(), &["sip:echo@initech.test", "--proxy", &proxy]);
    assert!(!ok, "a call to an unknown domain was answered");
    let (status, _, answer) = http("GET", api, "/v1/tenants/globex/flows", "acme-token", None);
    assert_eq!(status, 403, "{answer}");
    let (status, _, all) = http("GET", api, "/v1/flows", "dev-admin-token", None);
    assert_eq!(status, 200);
    assert_eq!(all["flows"].as_array().map(Vec::len), Some(2), "{all}");
}

#[test]
fn calls_and_records_are_listed_and_hung_up_per_tenant() {
    let (pb, api) = start_two_tenants(patchbay_stock_flows::ECHO.component);
    // A long call to acme (sipp waits 20 s before its BYE; the API hangs it up first).
    let sipp_dir = tempfile::tempdir().expect("tempdir");
    let mut sipp = Command::new("sipp")
        .current_dir(sipp_dir.path())
        .args(["-sn", "uac", "-s", "echo", "-i", "127.0.0.1", "-p", &free_port().to_string()])
        .args(["-m", "1", "-d", "20000", "-timeout", "30", "-nostdin"])
        .arg(format!("127.0.0.1:{}", pb.port))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run sipp");
    let started = Instant::now();
    let call = loop {
        let (status, _, calls) = http("GET", api, "/v1/calls", "acme-token", None);
        assert_eq!(status, 200, "{calls}");
        if let Some(call) = calls["calls"].as_array().and_then(|c| c.first()).cloned() {
            break call;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the call never showed up: {calls}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(call["tenant"], "acme", "{call}");
    assert_eq!(call["flow"], "echo", "{call}");
    assert_eq!(call["direction"], "inbound", "{call}");
    let id = call["id"].as_str().expect("id").to_owned();
    let path = format!("/v1/calls/{}", id.replace('@', "%40"));
    // globex sees none of it and cannot touch it.
    let (_, _, theirs) = http("GET", api, "/v1/calls", "globex-token", None);
    assert_eq!(theirs["calls"].as_array().map(Vec::len), Some(0), "{theirs}");
    for method in ["GET", "DELETE"] {
        let (status, _, answer) = http(method, api, &path, "globex-token", None);
        assert_eq!(status, 404, "{method} {path} with globex's token: {answer}");
    }
    let (status, _, one) = http("GET", api, &path, "acme-token", None);
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["id"], id.as_str());
    // acme hangs it up: BYE, and a record saying the API ended it.
    let (status, _, answer) = http("DELETE", api, &path, "acme-token", None);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "hanging-up", "{answer}");
    let cdrs = pb.wait_for_cdrs(1, Duration::from_secs(10));
    let _ = sipp.kill();
    let _ = sipp.wait();
    assert_eq!(cdrs.len(), 1, "{cdrs:?}");
    assert_eq!(cdrs[0]["end_cause"], "api-hangup", "{cdrs:?}");
    assert_eq!(cdrs[0]["hung_up_by"], "api", "{cdrs:?}");
    let (_, _, calls) = http("GET", api, "/v1/calls", "acme-token", None);
    assert_eq!(calls["calls"].as_array().map(Vec::len), Some(0), "{calls}");
    // The record through the API: acme's token sees it in its time range, globex's does not.
    let day = &cdrs[0]["start"].as_str().expect("start")[..10];
    let (status, _, records) = http("GET", api, &format!("/v1/cdrs?from={day}"), "acme-token", None);
    assert_eq!(status, 200, "{records}");
    assert_eq!(records["cdrs"].as_array().map(Vec::len), Some(1), "{records}");
    assert_eq!(records["cdrs"][0]["id"], id.as_str());
    let (_, _, records) = http("GET", api, &format!("/v1/cdrs?from={day}"), "globex-token", None);
    assert_eq!(records["cdrs"].as_array().map(Vec::len), Some(0), "{records}");
    let (_, _, records) = http("GET", api, "/v1/cdrs?to=2000-01-01", "acme-token", None);
    assert_eq!(records["cdrs"].as_array().map(Vec::len), Some(0), "{records}");
    let (status, _, _) = http("GET", api, "/v1/cdrs?from=yesterday", "acme-token", None);
    assert_eq!(status, 400);
    // The OpenAPI document is served.
    let (status, _, doc) = http("GET", api, "/v1/openapi.json", "", None);
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
}

#[test]
fn a_reload_applies_tenant_changes_all_or_nothing() {
    let (pb, api) = start_two_tenants(patchbay_stock_flows::ECHO.component);
    let path = pb.dir.path().join("patchbay.toml");
    let original = std::fs::read_to_string(&path).expect("config");
    let proxy = format!("127.0.0.1:{}", pb.port);
    let call =
        |uri: &str| patchbay_e2e::patchbay_call(pb.dir.path(), &[uri, "--proxy", &proxy, "--hangup-after", "0.3"]);
    assert!(!call("sip:hello@initech.test").0, "initech is not configured yet");

    // A new tenant with a stock flow: POST /v1/reload (admin only) applies it.
    let with_initech = format!(
        "{original}[[tenant]]\nid = \"initech\"\ndomains = [\"initech.test\"]\napi_token = \"initech-token\"\n\
         [[tenant.flow]]\nname = \"hello\"\nstock = \"echo\"\n"
    );
    std::fs::write(&path, &with_initech).expect("write config");
    let (status, _, answer) = http("POST", api, "/v1/reload", "acme-token", None);
    assert_eq!(status, 403, "a tenant token reloaded: {answer}");
    let (status, _, answer) = http("POST", api, "/v1/reload", ADMIN, None);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["tenants"], 3, "{answer}");
    assert!(
        answer["flows_updated"].as_array().is_some_and(|f| f.contains(&serde_json::json!("initech/hello"))),
        "{answer}"
    );
    let (ok, said) = call("sip:hello@initech.test");
    assert!(ok, "the reloaded tenant's flow did not answer: {said}");
    let (status, _, _) = http("GET", api, "/v1/flows", "initech-token", None);
    assert_eq!(status, 200, "the new tenant's token works");

    // A flow that does not compile: refused, nothing changes (initech still there, acme too).
    std::fs::write(pb.dir.path().join("broken.wasm"), b"\0asm\x0d\0\x01\0broken").expect("broken");
    let broken = format!("{with_initech}[[tenant.flow]]\nname = \"more\"\npath = \"broken.wasm\"\n");
    std::fs::write(&path, &broken).expect("write config");
    let (status, _, answer) = http("POST", api, "/v1/reload", ADMIN, None);
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["error"]["code"], "reload-refused", "{answer}");
    assert!(answer["error"]["message"].as_str().is_some_and(|m| m.contains("\"more\"")), "{answer}");
    assert!(call("sip:hello@initech.test").0, "a refused reload changed the running configuration");

    // A listener change needs a restart: refused.
    std::fs::write(&path, with_initech.replace(&format!("udp:127.0.0.1:{}", pb.port), "udp:127.0.0.1:1"))
        .expect("write");
    let (status, _, answer) = http("POST", api, "/v1/reload", ADMIN, None);
    assert_eq!(status, 422, "{answer}");
    assert!(answer["error"]["message"].as_str().is_some_and(|m| m.contains("[sip]")), "{answer}");

    // SIGHUP reloads too: back to the original, initech is gone (new calls 404).
    std::fs::write(&path, &original).expect("write config");
    let status = Command::new("kill").args(["-HUP", &pb.pid().to_string()]).status().expect("kill -HUP");
    assert!(status.success());
    let started = Instant::now();
    while call("sip:hello@initech.test").0 {
        assert!(started.elapsed() < Duration::from_secs(10), "SIGHUP did not reload");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(call("sip:echo@127.0.0.1").0, "acme's echo stopped answering after the reload");
}
