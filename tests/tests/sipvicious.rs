//! Patchbay against SIPVicious (Debian `sipvicious`), the scanner behind most of the SIP
//! attacks on the internet: `svmap` finds SIP servers, `svwar` guesses extensions, `svcrack`
//! guesses passwords. Against a tenant with digest authentication, `svwar` must find no user
//! and `svcrack` no password — while a control run shows that `svcrack` does find a password it
//! can reach — and a real caller must still get through afterwards.

use std::process::{Command, Stdio};
use std::time::Duration;

use patchbay_e2e::{Patchbay, free_port, sipp_digest_call, start_challenging_patchbay};

/// `alice`'s password in [`start_challenging_patchbay`].
const PASSWORD: &str = "s3cret";

/// Runs a SIPVicious tool for at most `limit`, from its own local port; returns its output.
fn sipvicious(tool: &str, args: &[&str], pb: &Patchbay, limit: Duration) -> String {
    let out = Command::new("timeout")
        .arg(limit.as_secs().to_string())
        .arg(tool)
        .args(args)
        .args(["-P", &free_port().to_string(), "-p", &pb.port.to_string(), "127.0.0.1"])
        .stdin(Stdio::null())
        .output()
        .expect("run sipvicious (Debian package sipvicious; `cargo xtask test` installs it)");
    let mut log = String::from_utf8_lossy(&out.stdout).into_owned();
    log.push_str(&String::from_utf8_lossy(&out.stderr));
    log
}

fn wordlist(dir: &std::path::Path, name: &str, words: usize, password_at: usize) -> String {
    let mut list: Vec<String> = (0..words).map(|n| format!("w{n:04}")).collect();
    list[password_at] = PASSWORD.to_owned();
    let path = dir.join(name);
    std::fs::write(&path, list.join("\n") + "\n").expect("write word list");
    path.to_string_lossy().into_owned()
}

#[test]
fn sipvicious_finds_no_user_and_no_password_and_callers_still_get_through() {
    let pb = start_challenging_patchbay();
    let dir = tempfile::tempdir().expect("tempdir");

    // svmap finds a SIP server (that is no secret: it answers OPTIONS).
    let log = sipvicious("svmap", &[], &pb, Duration::from_secs(30));
    assert!(log.contains("Patchbay"), "svmap did not see the server:\n{log}");

    // svwar, by REGISTER (its default) and by INVITE: every name gets the same answer, so no
    // extension stands out — not the real user, not the flow.
    let users = dir.path().join("users.txt");
    std::fs::write(&users, "alice\necho\nbob\nmenu\n100\n101\n1000\nadmin\n").expect("write users");
    let users = users.to_string_lossy().into_owned();
    for method in ["REGISTER", "INVITE"] {
        let log = sipvicious("svwar", &["-m", method, "-d", &users], &pb, Duration::from_secs(60));
        assert!(log.contains("found nothing"), "svwar -m {method} found something:\n{log}");
        assert!(!log.contains("reqauth") && !log.contains("noauth"), "svwar -m {method}:\n{log}");
    }

    // Control: the password third in a short list, from an address with a clean record. svcrack
    // gets past authentication (the domain-only Request-URI it uses then routes nowhere, and
    // it reports that 404 as "User not found"): the tool works against this server.
    let control = wordlist(dir.path(), "control.txt", 5, 2);
    let log = sipvicious("svcrack", &["-m", "INVITE", "-u", "alice", "-d", &control], &pb, Duration::from_secs(60));
    assert!(log.contains("User not found"), "svcrack never got past authentication:\n{log}");

    // The attack: 1,000 words with the password at 500. Without the throttle svcrack gets
    // through them in seconds; with it, the address is blocked after five failures and every
    // later guess is refused unchecked, so in the time given it never gets past authentication.
    let dictionary = wordlist(dir.path(), "dictionary.txt", 1_000, 500);
    let log = sipvicious("svcrack", &["-m", "INVITE", "-u", "alice", "-d", &dictionary], &pb, Duration::from_secs(40));
    assert!(!log.contains("User not found") && !log.contains("The password for"), "svcrack got through:\n{log}");

    // The real user, calling from another address, is not locked out by the attack on her name.
    let (ok, log) = sipp_digest_call(&pb, "127.0.0.2", PASSWORD);
    assert!(ok, "the real user's call failed after the attack:\n{log}");
}
