//! Operations (docs/operations.md): Prometheus metrics — a sipp call with speech and key
//! presses to the echo flow moves the counters, gauges and histograms it should, read back by
//! scraping `GET /metrics` and parsing the exposition; a call to an unknown extension is counted
//! without its extension becoming a label — JSON logs with the call's fields and masked SIP
//! traces, and CDR files rotated under load without losing a line.

use std::time::Duration;

use patchbay_e2e::{
    free_port, http_raw, launch_logging, run_sipp, scenario, start_patchbay_logging, start_patchbay_with,
};

/// `GET /metrics`: the status, content type and body.
fn scrape(api: u16) -> (u16, String, String) {
    let (status, head, body) = http_raw("GET", api, "/metrics", "", None);
    let content_type = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type:").map(|v| v.trim().to_owned()))
        .unwrap_or_default();
    (status, content_type, body)
}

/// One sample line of the exposition: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Parses the OpenMetrics text format (what Prometheus reads): `# TYPE`/`# HELP` comments, one
/// sample per line, `# EOF` last. Panics on a line that is neither.
fn parse(text: &str) -> Vec<Sample> {
    assert!(text.trim_end().ends_with("# EOF"), "an OpenMetrics exposition ends with # EOF");
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number in: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let inner = rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels: {line}"));
                let labels = inner
                    .split(',')
                    .filter(|l| !l.is_empty())
                    .map(|pair| {
                        let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("bad label in: {line}"));
                        (k.to_owned(), v.trim_matches('"').to_owned())
                    })
                    .collect();
                (name, labels)
            }
            None => (series, Vec::new()),
        };
        samples.push(Sample { name: name.to_owned(), labels, value });
    }
    samples
}

/// The sum of the samples named `name` whose labels include all of `with`.
fn value(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| with.iter().all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v)))
        .map(|s| s.value)
        .sum()
}

#[test]
fn a_call_moves_the_counters_and_histograms_it_should() {
    let api = free_port();
    let pb = start_patchbay_with(
        &format!("[api]\nlisten = \"127.0.0.1:{api}\"\n"),
        "[[tenant.flow]]\nname = \"echo\"\nstock = \"echo\"\n",
    );
    let (status, content_type, body) = scrape(api);
    assert_eq!(status, 200, "{body}");
    assert!(content_type.starts_with("application/openmetrics-text"), "{content_type}");
    let before = parse(&body);
    assert_eq!(value(&before, "patchbay_flows_loaded", &[("tenant", "test")]), 1.0);
    // The series with fixed labels are there from the start, at 0 (alerts need no `or vector(0)`).
    for (name, labels) in [
        ("patchbay_sip_messages_total", [("direction", "in"), ("kind", "request")]),
        ("patchbay_sip_dropped_total", [("reason", "queue-full"), ("reason", "queue-full")]),
        ("patchbay_sip_final_responses_total", [("direction", "out"), ("class", "5xx")]),
        ("patchbay_rtp_packets_total", [("direction", "in"), ("direction", "in")]),
    ] {
        let present = before
            .iter()
            .any(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v)));
        assert!(present, "{name} {labels:?} in the exposition from the start:\n{body}");
        assert_eq!(value(&before, name, &labels), 0.0);
    }
    assert_eq!(value(&before, "patchbay_draining", &[]), 0.0);
    // (Label families appear with their first series; the others from the start.)
    for family in [
        "patchbay_sip_transactions",
        "patchbay_rtp_lost",
        "patchbay_media_clock_lateness_seconds",
        "patchbay_cdrs_written",
    ] {
        assert!(body.contains(&format!("# HELP {family} ")), "{family} is documented in the exposition:\n{body}");
    }

    // A call with speech and three key presses (sipp's pcaps), hung up by sipp.
    let port = pb.port;
    let call = std::thread::spawn(move || run_sipp(port, "echo", &["-sf", &scenario("uac_pcap_echo.xml")], 1, &[]));
    std::thread::sleep(Duration::from_millis(2_000));
    let during = parse(&scrape(api).2);
    let echo_in = [("tenant", "test"), ("flow", "echo"), ("direction", "inbound")];
    assert_eq!(value(&during, "patchbay_calls_active", &echo_in), 1.0, "the call is up");
    assert_eq!(value(&during, "patchbay_tenant_calls", &[("tenant", "test")]), 1.0);
    assert_eq!(value(&during, "patchbay_sip_dialogs", &[]), 1.0);
    // RTP is counted while the call lasts (about once a second), not only at its end.
    assert!(value(&during, "patchbay_rtp_packets_total", &[("direction", "in")]) > 0.0, "live RTP counters");
    assert!(value(&during, "patchbay_rtp_packets_total", &[("direction", "out")]) > 0.0, "live RTP counters");
    let (ok, log) = call.join().expect("sipp");
    assert!(ok, "{log}");
    pb.wait_for_cdrs(1, Duration::from_secs(10));

    // A call to an extension nobody serves: counted, its extension not a label.
    let (ok, log) = run_sipp(pb.port, "nosuch", &["-sn", "uac"], 1, &[]);
    assert!(!ok && log.contains("404"), "{log}");
    pb.wait_for_cdrs(2, Duration::from_secs(10));

    let (_, _, body) = scrape(api);
    let after = parse(&body);
    assert!(!body.contains("nosuch"), "a requested extension never becomes a label:\n{body}");
    let v = |name: &str, with: &[(&str, &str)]| value(&after, name, with);
    assert_eq!(v("patchbay_calls_started_total", &echo_in), 1.0);
    assert_eq!(v("patchbay_calls_active", &echo_in), 0.0, "the call has ended");
    assert_eq!(v("patchbay_calls_ended_total", &[("flow", "echo"), ("cause", "caller-hangup")]), 1.0);
    assert_eq!(v("patchbay_calls_ended_total", &[("tenant", "test"), ("flow", ""), ("cause", "no-route")]), 1.0);
    assert_eq!(v("patchbay_flow_runs_total", &[("tenant", "test"), ("flow", "echo")]), 1.0);
    assert_eq!(v("patchbay_flow_run_seconds_count", &[("tenant", "test"), ("flow", "echo")]), 1.0);
    assert_eq!(v("patchbay_agent_sessions_total", &[]), 0.0);
    assert_eq!(v("patchbay_call_setup_seconds_count", &[("direction", "inbound")]), 1.0);
    let setup = v("patchbay_call_setup_seconds_sum", &[("direction", "inbound")]);
    assert!(setup > 0.0 && setup < 5.0, "set-up took {setup} s");
    // SIP: the INVITE, ACK and BYE in (and the refused INVITE with its ACK); 200s to the INVITE
    // and the BYE out, and the 404.
    assert!(v("patchbay_sip_messages_total", &[("direction", "in"), ("kind", "request")]) >= 5.0);
    assert!(v("patchbay_sip_messages_total", &[("direction", "out"), ("kind", "response")]) >= 3.0);
    assert!(v("patchbay_sip_final_responses_total", &[("direction", "out"), ("class", "2xx")]) >= 2.0);
    assert!(v("patchbay_sip_final_responses_total", &[("direction", "out"), ("class", "4xx")]) >= 1.0);
    // Media: sipp's speech in, the echo out, one jitter figure, the clock's steps.
    assert!(v("patchbay_rtp_packets_total", &[("direction", "in")]) > 100.0, "{body}");
    assert!(v("patchbay_rtp_packets_total", &[("direction", "out")]) > 100.0, "{body}");
    assert_eq!(v("patchbay_rtp_jitter_seconds_count", &[]), 1.0);
    assert!(v("patchbay_media_clock_lateness_seconds_count", &[]) > 1_000.0);
    assert_eq!(v("patchbay_cdrs_written_total", &[]), 2.0);
    assert_eq!(v("patchbay_cdr_write_failures_total", &[]), 0.0);
    assert_eq!(v("patchbay_tenant_calls", &[("tenant", "test")]), 0.0);
    assert_eq!(v("patchbay_sip_dialogs", &[]), 0.0);
}

#[test]
fn json_logs_parse_and_carry_the_call_and_the_sip_trace_shows_its_messages() {
    let pb = start_patchbay_logging(
        "[log]\nformat = \"json\"\nsip_trace = true\n",
        "[[tenant.flow]]\nname = \"echo\"\nstock = \"echo\"\n",
        true,
    );
    let (ok, log) = run_sipp(pb.port, "echo", &["-sn", "uac"], 1, &[]);
    assert!(ok, "{log}");
    let cdrs = pb.wait_for_cdrs(1, Duration::from_secs(10));
    let call_id = cdrs[0]["call_id"].as_str().expect("a Call-ID").to_owned();
    std::thread::sleep(Duration::from_millis(300));
    let text = pb.log();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}")))
        .collect();
    assert!(lines.len() > 5, "{text}");
    assert!(!text.contains('\u{1b}'), "no terminal escape codes in a log file");
    // The call's own lines name it: the answer and the record.
    let about_call: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["fields"]["call_id"] == call_id.as_str()).collect();
    for said in ["call started", "answering", "call ended"] {
        assert!(about_call.iter().any(|l| l["fields"]["message"] == said), "{said}: {about_call:#?}");
    }
    // The flow's task's lines carry the call in their span.
    assert!(lines.iter().any(|l| l["span"]["name"] == "call" && l["span"]["call_id"] == call_id.as_str()), "{text}");
    assert!(about_call.iter().any(|l| l["target"] == "patchbay::cdr"), "{about_call:#?}");
    assert!(
        about_call.iter().all(|l| l["fields"]["tenant"] == "test" && l["fields"]["flow"] == "echo"),
        "{about_call:#?}"
    );
    // Every SIP message of the call, both ways, whole.
    let traced: Vec<&str> = lines
        .iter()
        .filter(|l| l["target"] == "patchbay::sip_trace")
        .filter_map(|l| l["fields"]["message"].as_str())
        .filter(|m| m.contains(&call_id))
        .collect();
    for (what, needle) in [("INVITE in", "INVITE sip:echo@"), ("200 out", "SIP/2.0 200 OK"), ("BYE in", "BYE sip:")] {
        assert!(traced.iter().any(|m| m.contains(needle)), "{what} traced: {traced:#?}");
    }
}

#[test]
fn cdr_files_rotate_under_200_calls_per_second_without_losing_a_line() {
    // Records are ~650 bytes: a 16 KiB file holds about 25.
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("patchbay.log")).expect("log file");
    let config = format!(
        "[sip]\nlisten = [\"udp:127.0.0.1:{port}\"]\n[cdr]\npath = \"cdr.jsonl\"\nrotate_kb = 16\n\
         [[tenant]]\nid = \"test\"\ndomains = [\"127.0.0.1\"]\n[[tenant.flow]]\nname = \"echo\"\nstock = \"echo\"\n"
    );
    let pb = launch_logging(dir, port, &config, std::process::Stdio::from(log));
    let calls = 1_000;
    let (ok, log) = run_sipp(pb.port, "echo", &["-sn", "uac"], calls, &["-r", "200", "-l", "400"]);
    assert!(ok, "{log}");
    pb.wait_for_cdrs(1, Duration::from_secs(1));
    let started = std::time::Instant::now();
    let read_all = || {
        let mut files = Vec::new();
        let mut records = Vec::new();
        let mut record_ids = Vec::new();
        for entry in std::fs::read_dir(pb.dir.path()).expect("read dir").flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("cdr") && name.ends_with(".jsonl") {
                let text = std::fs::read_to_string(entry.path()).expect("read");
                assert!(text.is_empty() || text.ends_with('\n'), "{name} ends mid-line");
                for line in text.lines() {
                    let record: serde_json::Value = serde_json::from_str(line)
                        .unwrap_or_else(|e| panic!("{name}: not a whole record ({e}): {line}"));
                    records.push(record["call_id"].as_str().unwrap_or_default().to_owned());
                    record_ids.push(record["record_id"].as_str().unwrap_or_default().to_owned());
                }
                files.push(name);
            }
        }
        (files, records, record_ids)
    };
    let (files, mut records, mut record_ids) = loop {
        let (files, records, record_ids) = read_all();
        if records.len() >= calls as usize || started.elapsed() > Duration::from_secs(20) {
            break (files, records, record_ids);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(files.len() > 10, "rotated into many files: {files:?}");
    assert_eq!(records.len(), calls as usize, "one record per call, across {} files", files.len());
    records.sort();
    records.dedup();
    assert_eq!(records.len(), calls as usize, "no record written twice");
    record_ids.sort();
    record_ids.dedup();
    assert!(record_ids.iter().all(|id| id.len() == 32), "record ids are 128-bit hex");
    assert_eq!(record_ids.len(), calls as usize, "every record has its own record_id");
    assert!(!pb.log().contains('\u{1b}'), "a plain log written to a file has no colour codes");
}
