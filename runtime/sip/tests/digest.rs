//! Digest authentication: RFC test vectors, header grammar, and client ↔ server exchanges.

use patchbay_sip::auth::{
    Algorithm, AuthError, AuthKind, Challenge, Credentials, CredentialsHeader, DigestClient, DigestRequest,
    DigestServer, Outcome, Qop, QopOptions, Rejection, ServerConfig, StoredSecret, ha1,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// RFC vectors, through the public client
// ---------------------------------------------------------------------------------------------

const RFC7616_NONCE: &str = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v";
const RFC7616_CNONCE: &str = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ";
const RFC7616_OPAQUE: &str = "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS";

fn rfc7616_challenge(algorithm: &str) -> String {
    format!(
        r#"Digest realm="http-auth@example.org", qop="auth, auth-int", algorithm={algorithm}, nonce="{RFC7616_NONCE}", opaque="{RFC7616_OPAQUE}""#
    )
}

fn get_index() -> DigestRequest<'static> {
    DigestRequest::new("GET", "/dir/index.html", b"")
}

#[test]
fn rfc2617_section_3_5() {
    let challenge = r#"Digest realm="testrealm@host.com", qop="auth,auth-int", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41""#;
    let mut client = DigestClient::new("Mufasa", "Circle Of Life");
    let header = client.respond(AuthKind::Www, &[challenge], &get_index(), &[], "0a4f113b").unwrap();
    assert_eq!(header.kind, AuthKind::Www);
    let creds: Credentials = header.value.parse().unwrap();
    assert_eq!(creds.response, "6629fae49393a05397450978507c4ef1");
    assert_eq!(creds.username, "Mufasa");
    assert_eq!(creds.realm, "testrealm@host.com");
    assert_eq!(creds.uri, "/dir/index.html");
    assert_eq!(creds.qop, Some(Qop::Auth));
    assert_eq!(creds.nc, Some(1));
    assert_eq!(creds.cnonce.as_deref(), Some("0a4f113b"));
    assert_eq!(creds.opaque.as_deref(), Some("5ccc069c403ebaf9f0171e9517f40e41"));
    // The challenge had no algorithm parameter, so none is echoed (an RFC 2617 server).
    assert_eq!(creds.algorithm, None);
    assert!(header.value.contains("qop=auth, nc=00000001"), "{}", header.value);
}

#[test]
fn rfc7616_section_3_9_1_md5() {
    let mut client = DigestClient::new("Mufasa", "Circle of Life");
    let header =
        client.respond(AuthKind::Www, &[&rfc7616_challenge("MD5")], &get_index(), &[], RFC7616_CNONCE).unwrap();
    let creds: Credentials = header.value.parse().unwrap();
    assert_eq!(creds.response, "8ca523f5e9506fed4657c9700eebdbec");
    assert_eq!(creds.algorithm, Some(Algorithm::Md5));
}

#[test]
fn rfc7616_section_3_9_1_sha256_preferred_over_md5() {
    // The RFC's own example: the server offers SHA-256 first and MD5 second. Offer them in the
    // other order too: the client picks the strongest either way (RFC 7616 §3.7).
    for order in [["SHA-256", "MD5"], ["MD5", "SHA-256"]] {
        let challenges = order.map(rfc7616_challenge);
        let values: Vec<&str> = challenges.iter().map(String::as_str).collect();
        let mut client = DigestClient::new("Mufasa", "Circle of Life");
        let header = client.respond(AuthKind::Www, &values, &get_index(), &[], RFC7616_CNONCE).unwrap();
        let creds: Credentials = header.value.parse().unwrap();
        assert_eq!(creds.algorithm, Some(Algorithm::Sha256));
        assert_eq!(creds.response, "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1");
    }
    // Both challenges in one comma-joined header value.
    let joined = format!("{}, {}", rfc7616_challenge("MD5"), rfc7616_challenge("SHA-256"));
    let mut client = DigestClient::new("Mufasa", "Circle of Life");
    let header = client.respond(AuthKind::Www, &[&joined], &get_index(), &[], RFC7616_CNONCE).unwrap();
    assert!(header.value.contains("753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"));
}

#[test]
fn ha1_helper_matches_rfc2617() {
    // RFC 2617 §3.5: HA1 = MD5("Mufasa:testrealm@host.com:Circle Of Life").
    assert_eq!(
        ha1(Algorithm::Md5, "Mufasa", "testrealm@host.com", "Circle Of Life"),
        "939e7578ed9e3c518a452acee763bce9"
    );
}

// ---------------------------------------------------------------------------------------------
// Grammar
// ---------------------------------------------------------------------------------------------

#[test]
fn parses_sip_challenge_with_all_parameters() {
    let value = r#"digest REALM="atlanta.com", Nonce="84a4cc6f3082121f32b42a2187831a9e", opaque="", algorithm=md5, qop="auth,auth-int", stale=TRUE, unknown="x, y", charset=UTF-8"#;
    let challenge: Challenge = value.parse().unwrap();
    assert_eq!(challenge.realm, "atlanta.com");
    assert_eq!(challenge.nonce, "84a4cc6f3082121f32b42a2187831a9e");
    assert_eq!(challenge.opaque.as_deref(), Some(""));
    assert_eq!(challenge.algorithm, Some(Algorithm::Md5));
    assert_eq!(challenge.qop, Some(QopOptions { auth: true, auth_int: true }));
    assert!(challenge.stale);
    assert_eq!(
        challenge.to_string(),
        r#"Digest realm="atlanta.com", nonce="84a4cc6f3082121f32b42a2187831a9e", opaque="", algorithm=MD5, qop="auth,auth-int", stale=TRUE"#
    );
}

#[test]
fn parses_quoted_string_escapes() {
    let challenge: Challenge = r#"Digest realm="say \"hi\" \\ bye", nonce="n""#.parse().unwrap();
    assert_eq!(challenge.realm, r#"say "hi" \ bye"#);
    assert_eq!(challenge.to_string(), r#"Digest realm="say \"hi\" \\ bye", nonce="n""#);
}

#[test]
fn parses_rfc3261_credentials_example() {
    // RFC 3261 §22.4 / §25.1 shape, with unquoted qop and nc and parameters out of order.
    let value = r#"Digest username="bob", realm="biloxi.com", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", uri="sip:bob@biloxi.com", qop=auth, nc=00000001, cnonce="0a4f113b", response="6629fae49393a05397450978507c4ef1", opaque="5ccc069c403ebaf9f0171e9517f40e41""#;
    let creds: Credentials = value.parse().unwrap();
    assert_eq!(creds.username, "bob");
    assert_eq!(creds.uri, "sip:bob@biloxi.com");
    assert_eq!(creds.qop, Some(Qop::Auth));
    assert_eq!(creds.nc, Some(1));
    assert_eq!(creds.algorithm, None);
    assert_eq!(creds.effective_algorithm(), Algorithm::Md5);
}

#[test]
fn rejects_bad_credentials() {
    let missing_uri = r#"Digest username="bob", realm="r", nonce="n", response="00""#;
    assert!(matches!(missing_uri.parse::<Credentials>(), Err(AuthError::Malformed(_))));
    let qop_without_nc = r#"Digest username="b", realm="r", nonce="n", uri="u", response="0", qop=auth, cnonce="c""#;
    assert!(matches!(qop_without_nc.parse::<Credentials>(), Err(AuthError::Malformed(_))));
    let bad_nc = r#"Digest username="b", realm="r", nonce="n", uri="u", response="0", qop=auth, cnonce="c", nc=xyz"#;
    assert!(matches!(bad_nc.parse::<Credentials>(), Err(AuthError::Malformed(_))));
    let duplicate = r#"Digest username="b", username="a", realm="r", nonce="n", uri="u", response="0""#;
    assert!(matches!(duplicate.parse::<Credentials>(), Err(AuthError::Malformed(_))));
    let sha512 = r#"Digest username="b", realm="r", nonce="n", uri="u", response="0", algorithm=SHA-512-256"#;
    assert_eq!(sha512.parse::<Credentials>(), Err(AuthError::UnsupportedAlgorithm));
    let userhash = r#"Digest username="b", realm="r", nonce="n", uri="u", response="0", userhash=true"#;
    assert_eq!(userhash.parse::<Credentials>(), Err(AuthError::Unsupported("userhash")));
}

#[test]
fn parse_all_skips_unusable_challenges() {
    let value = r#"Basic realm="x", Digest realm="a", nonce="1", algorithm=SHA-512-256, Digest realm="a", nonce="2", algorithm=SHA-256-sess, Newauth realm="apps", type=1"#;
    let challenges = Challenge::parse_all(value).unwrap();
    assert_eq!(challenges.len(), 1);
    assert_eq!(challenges[0].nonce, "2");
    assert_eq!(challenges[0].algorithm, Some(Algorithm::Sha256Sess));
}

fn text() -> impl Strategy<Value = String> {
    // Any non-control text, including quotes and backslashes that must be escaped.
    "[^\\p{Cc}]{0,24}"
}

fn algorithm() -> impl Strategy<Value = Option<Algorithm>> {
    prop_oneof![
        Just(None),
        Just(Some(Algorithm::Md5)),
        Just(Some(Algorithm::Md5Sess)),
        Just(Some(Algorithm::Sha256)),
        Just(Some(Algorithm::Sha256Sess)),
    ]
}

proptest! {
    #[test]
    fn challenge_parse_print_identity(
        realm in text(), nonce in text(), opaque in proptest::option::of(text()), domain in proptest::option::of(text()),
        algorithm in algorithm(), qop in proptest::option::of((any::<bool>(), any::<bool>())), stale in any::<bool>(),
    ) {
        let mut challenge = Challenge::new(realm, nonce);
        challenge.opaque = opaque;
        challenge.domain = domain;
        challenge.algorithm = algorithm;
        challenge.qop = qop.map(|(auth, auth_int)| QopOptions { auth, auth_int });
        challenge.stale = stale;
        let printed = challenge.to_string();
        prop_assert_eq!(printed.parse::<Challenge>(), Ok(challenge));
    }

    #[test]
    fn credentials_parse_print_identity(
        username in text(), realm in text(), nonce in text(), uri in text(), opaque in proptest::option::of(text()),
        algorithm in algorithm(), qop in proptest::option::of((any::<bool>(), "[a-zA-Z0-9+/]{1,16}", any::<u32>())),
    ) {
        let mut client = DigestClient::new(username.clone(), "pw");
        // Build through the client so the struct's non-exhaustive fields are set the public way.
        let mut challenge = Challenge::new(realm, nonce);
        challenge.opaque = opaque;
        challenge.algorithm = algorithm;
        challenge.qop = qop.as_ref().map(|(int, _, _)| if *int { QopOptions { auth: false, auth_int: true } } else { QopOptions::AUTH });
        let cnonce = qop.as_ref().map_or("unused", |(_, c, _)| c.as_str());
        let header = client.respond(AuthKind::Www, &[&challenge.to_string()], &DigestRequest::new("INVITE", &uri, b"v=0"), &[], cnonce).unwrap();
        let creds: Credentials = header.value.parse().unwrap();
        prop_assert_eq!(&creds.username, &username);
        prop_assert_eq!(&creds.uri, &uri);
        prop_assert_eq!(creds.to_string().parse::<Credentials>(), Ok(creds.clone()));
        // Any nonce count survives print and parse.
        if let Some((_, _, nc)) = qop {
            let mut with_nc = creds;
            with_nc.nc = Some(nc);
            prop_assert_eq!(with_nc.to_string().parse::<Credentials>(), Ok(with_nc.clone()));
        }
    }

    #[test]
    fn parsers_never_panic(value in "\\PC{0,200}") {
        let _ = value.parse::<Challenge>();
        let _ = value.parse::<Credentials>();
        let _ = Challenge::parse_all(&value);
    }
}

// ---------------------------------------------------------------------------------------------
// Client ↔ server
// ---------------------------------------------------------------------------------------------

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
const T0: u64 = 1_700_000_000;

fn users(username: &str, realm: &str, _algorithm: Algorithm) -> Option<StoredSecret> {
    (username == "alice" && realm == "example.com").then(|| StoredSecret::Password("wonderland".into()))
}

fn server_with(configure: impl FnOnce(&mut ServerConfig)) -> DigestServer {
    let mut config = ServerConfig::new("example.com", SECRET);
    configure(&mut config);
    DigestServer::new(config, T0).expect("valid test config")
}

fn server() -> DigestServer {
    server_with(|_| {})
}

fn header_values(outcome: &Outcome) -> Vec<String> {
    match outcome {
        Outcome::Challenge { challenges, .. } => challenges.iter().map(ToString::to_string).collect(),
        other => panic!("expected a challenge, got {other:?}"),
    }
}

fn refs(values: &[String]) -> Vec<&str> {
    values.iter().map(String::as_str).collect()
}

fn value(header: &CredentialsHeader) -> &str {
    &header.value
}

fn authorized(name: &str) -> Outcome {
    Outcome::Authorized { username: name.into() }
}

#[test]
fn challenge_authorize_accept() {
    let mut server = server();
    let mut client = DigestClient::new("alice", "wonderland");
    let register = DigestRequest::new("REGISTER", "sip:example.com", b"");

    let outcome = server.verify(T0, &register, &[], &users);
    assert!(matches!(outcome, Outcome::Challenge { stale: false, .. }));
    let challenges = header_values(&outcome);
    assert_eq!(challenges.len(), 2, "SHA-256 and MD5 offered");
    assert!(challenges[0].contains("algorithm=SHA-256") && challenges[1].contains("algorithm=MD5"));

    let header = client.respond(AuthKind::Www, &refs(&challenges), &register, &[], "cn-1").unwrap();
    assert!(header.value.contains("algorithm=SHA-256"));
    assert_eq!(server.verify(T0 + 1, &register, &[value(&header)], &users), authorized("alice"));
}

#[test]
fn precomputed_ha1_store() {
    let md5 = ha1(Algorithm::Md5, "alice", "example.com", "wonderland");
    let sha = ha1(Algorithm::Sha256, "alice", "example.com", "wonderland").to_uppercase();
    let store = move |user: &str, _realm: &str, algorithm: Algorithm| {
        (user == "alice").then(|| match algorithm {
            Algorithm::Md5 | Algorithm::Md5Sess => StoredSecret::Ha1(md5.clone()),
            _ => StoredSecret::Ha1(sha.clone()),
        })
    };
    for offered in [Algorithm::Md5, Algorithm::Sha256, Algorithm::Md5Sess, Algorithm::Sha256Sess] {
        let mut server = server_with(|c| c.algorithms = vec![offered]);
        let mut client = DigestClient::new("alice", "wonderland");
        let request = DigestRequest::new("OPTIONS", "sip:example.com", b"");
        let challenges = header_values(&server.verify(T0, &request, &[], &store));
        let header = client.respond(AuthKind::Www, &refs(&challenges), &request, &[], "abc").unwrap();
        assert_eq!(server.verify(T0, &request, &[value(&header)], &store), authorized("alice"), "{offered}");
        // A second request reusing the nonce: for -sess the client keeps its first cnonce.
        let again = client.authorize(&request, "def");
        assert_eq!(server.verify(T0, &request, &[value(&again[0])], &store), authorized("alice"), "{offered}");
    }
}

#[test]
fn wrong_password_rejected_and_client_stops() {
    let mut server = server();
    let mut client = DigestClient::new("alice", "guess");
    let request = DigestRequest::new("INVITE", "sip:bob@example.com", b"v=0\r\n");
    let challenges = header_values(&server.verify(T0, &request, &[], &users));
    let header = client.respond(AuthKind::Www, &refs(&challenges), &request, &[], "c1").unwrap();
    assert_eq!(server.verify(T0, &request, &[value(&header)], &users), Outcome::Rejected(Rejection::WrongCredentials));

    // The application re-challenges (fresh nonce, no stale): the client sees its credentials
    // were refused instead of retrying forever.
    let again: Vec<String> = server.challenge(T0).iter().map(ToString::to_string).collect();
    assert_eq!(
        client.respond(AuthKind::Www, &refs(&again), &request, &[value(&header)], "c2"),
        Err(AuthError::CredentialsRejected { realm: "example.com".into() })
    );
    // Same nonce re-challenged without stale: also refused (the brief's loop case).
    assert!(matches!(
        client.respond(AuthKind::Www, &refs(&challenges), &request, &[value(&header)], "c3"),
        Err(AuthError::CredentialsRejected { .. })
    ));
}

#[test]
fn unknown_user_rejected() {
    let mut server = server();
    let mut client = DigestClient::new("mallory", "wonderland");
    let request = DigestRequest::new("REGISTER", "sip:example.com", b"");
    let challenges = header_values(&server.verify(T0, &request, &[], &users));
    let header = client.respond(AuthKind::Www, &refs(&challenges), &request, &[], "c").unwrap();
    assert_eq!(server.verify(T0, &request, &[value(&header)], &users), Outcome::Rejected(Rejection::UnknownUser));
}

#[test]
fn replayed_nonce_count_rejected() {
    let mut server = server();
    let mut client = DigestClient::new("alice", "wonderland");
    let request = DigestRequest::new("MESSAGE", "sip:bob@example.com", b"hi");
    let challenges = header_values(&server.verify(T0, &request, &[], &users));
    let first = client.respond(AuthKind::Www, &refs(&challenges), &request, &[], "c1").unwrap();
    assert_eq!(server.verify(T0, &request, &[value(&first)], &users), authorized("alice"));
    assert_eq!(server.verify(T0, &request, &[value(&first)], &users), Outcome::Rejected(Rejection::Replay));

    let second = client.authorize(&request, "c2");
    assert!(second[0].value.contains("nc=00000002"));
    assert_eq!(server.verify(T0 + 2, &request, &[value(&second[0])], &users), authorized("alice"));
    // nc 1 again after nc 2: below the highest seen.
    assert_eq!(server.verify(T0 + 2, &request, &[value(&first)], &users), Outcome::Rejected(Rejection::Replay));
}

#[test]
fn expired_nonce_stale_then_transparent_retry() {
    let mut server = server_with(|c| c.nonce_lifetime_secs = 60);
    let mut client = DigestClient::new("alice", "wonderland");
    let invite = DigestRequest::new("INVITE", "sip:bob@example.com", b"");
    let challenges = header_values(&server.verify(T0, &invite, &[], &users));
    let header = client.respond(AuthKind::Www, &refs(&challenges), &invite, &[], "c1").unwrap();
    assert_eq!(server.verify(T0, &invite, &[value(&header)], &users), authorized("alice"));

    // Two minutes later the dialog's BYE reuses the nonce, which has expired.
    let bye = DigestRequest::new("BYE", "sip:bob@192.0.2.4:5060", b"");
    let reused = client.authorize(&bye, "c2");
    let outcome = server.verify(T0 + 120, &bye, &[value(&reused[0])], &users);
    assert!(matches!(outcome, Outcome::Challenge { stale: true, .. }), "{outcome:?}");
    let stale = header_values(&outcome);
    assert!(stale.iter().all(|c| c.contains("stale=TRUE")));

    // The client answers the stale challenge without new credentials and without error.
    let retry = client.respond(AuthKind::Www, &refs(&stale), &bye, &[value(&reused[0])], "c3").unwrap();
    assert_eq!(server.verify(T0 + 121, &bye, &[value(&retry)], &users), authorized("alice"));
}

#[test]
fn wrong_password_with_expired_nonce_is_not_stale() {
    let mut server = server_with(|c| c.nonce_lifetime_secs = 60);
    let mut client = DigestClient::new("alice", "guess");
    let request = DigestRequest::new("INVITE", "sip:bob@example.com", b"");
    let challenges = header_values(&server.verify(T0, &request, &[], &users));
    let header = client.respond(AuthKind::Www, &refs(&challenges), &request, &[], "c1").unwrap();
    // stale=TRUE would tell an attacker the guess was right (RFC 7616 §3.3).
    assert_eq!(
        server.verify(T0 + 600, &request, &[value(&header)], &users),
        Outcome::Rejected(Rejection::WrongCredentials)
    );
}

#[test]
fn foreign_nonce_with_right_password_gets_stale_challenge() {
    // The RFC 7616 vector against a server of that realm: the digest is right, but the nonce
    // is not one this server issued (another secret, or a previous process).
    let mut server = DigestServer::new(ServerConfig::new("http-auth@example.org", SECRET), T0).unwrap();
    let store =
        |u: &str, _: &str, _: Algorithm| (u == "Mufasa").then(|| StoredSecret::Password("Circle of Life".into()));
    let mut client = DigestClient::new("Mufasa", "Circle of Life");
    let header =
        client.respond(AuthKind::Www, &[&rfc7616_challenge("SHA-256")], &get_index(), &[], RFC7616_CNONCE).unwrap();
    // Drop opaque: it is the RFC's, not ours.
    let mut creds: Credentials = header.value.parse().unwrap();
    creds.opaque = None;
    let outcome = server.verify(T0, &get_index(), &[&creds.to_string()], &store);
    assert!(matches!(outcome, Outcome::Challenge { stale: true, .. }), "{outcome:?}");
}

#[test]
fn nonce_from_before_a_restart_is_stale() {
    let mut before = server();
    let request = DigestRequest::new("REGISTER", "sip:example.com", b"");
    let challenges = header_values(&before.verify(T0, &request, &[], &users));
    let mut client = DigestClient::new("alice", "wonderland");
    let header = client.respond(AuthKind::Www, &refs(&challenges), &request, &[], "c").unwrap();
    // Same secret, restarted ten seconds later: the replay table is gone, so the nonce is stale.
    let mut after = DigestServer::new(ServerConfig::new("example.com", SECRET), T0 + 10).unwrap();
    let outcome = after.verify(T0 + 10, &request, &[value(&header)], &users);
    assert!(matches!(outcome, Outcome::Challenge { stale: true, .. }));
}

#[test]
fn uri_must_match_request_uri() {
    let mut server = server();
    let mut client = DigestClient::new("alice", "wonderland");
    let invite = DigestRequest::new("INVITE", "sip:bob@example.com", b"");
    let challenges = header_values(&server.verify(T0, &invite, &[], &users));
    let header = client.respond(AuthKind::Www, &refs(&challenges), &invite, &[], "c").unwrap();
    let elsewhere = DigestRequest::new("INVITE", "sip:premium-rate@example.com", b"");
    assert_eq!(server.verify(T0, &elsewhere, &[value(&header)], &users), Outcome::Rejected(Rejection::UriMismatch));
    // Only case differs (a proxy lower-cased the host): accepted.
    let recased = DigestRequest::new("INVITE", "sip:bob@EXAMPLE.com", b"");
    assert_eq!(server.verify(T0, &recased, &[value(&header)], &users), authorized("alice"));
}

#[test]
fn method_is_authenticated() {
    let mut server = server();
    let mut client = DigestClient::new("alice", "wonderland");
    let options = DigestRequest::new("OPTIONS", "sip:bob@example.com", b"");
    let challenges = header_values(&server.verify(T0, &options, &[], &users));
    let header = client.respond(AuthKind::Www, &refs(&challenges), &options, &[], "c").unwrap();
    let invite = DigestRequest::new("INVITE", "sip:bob@example.com", b"");
    assert_eq!(server.verify(T0, &invite, &[value(&header)], &users), Outcome::Rejected(Rejection::WrongCredentials));
}

#[test]
fn auth_int_covers_the_body() {
    let mut server = server_with(|c| c.qop = QopOptions { auth: false, auth_int: true });
    let mut client = DigestClient::new("alice", "wonderland");
    let sdp = b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\n";
    let invite = DigestRequest::new("INVITE", "sip:bob@example.com", sdp);
    let challenges = header_values(&server.verify(T0, &invite, &[], &users));
    let header = client.respond(AuthKind::Www, &refs(&challenges), &invite, &[], "c").unwrap();
    assert!(header.value.contains("qop=auth-int"));
    let tampered = DigestRequest::new("INVITE", "sip:bob@example.com", b"v=0\r\no=- 1 1 IN IP4 203.0.113.9\r\n");
    assert_eq!(server.verify(T0, &tampered, &[value(&header)], &users), Outcome::Rejected(Rejection::WrongCredentials));
    assert_eq!(server.verify(T0, &invite, &[value(&header)], &users), authorized("alice"));
}

#[test]
fn qop_auth_int_only_when_offered() {
    let mut auth_int_server = server_with(|c| c.qop = QopOptions { auth: false, auth_int: true });
    let mut server = server();
    let mut client = DigestClient::new("alice", "wonderland");
    let request = DigestRequest::new("INVITE", "sip:bob@example.com", b"");
    let challenges = header_values(&auth_int_server.verify(T0, &request, &[], &users));
    let header = client.respond(AuthKind::Www, &refs(&challenges), &request, &[], "c").unwrap();
    // Same realm and secret, but this server only offers qop=auth.
    assert_eq!(server.verify(T0, &request, &[value(&header)], &users), Outcome::Rejected(Rejection::QopNotOffered));
}

#[test]
fn legacy_rfc2069_mode() {
    // An old server: no qop in the challenge. The client answers without cnonce/nc.
    let mut server = server_with(|c| {
        c.qop = QopOptions::default();
        c.allow_legacy = true;
        c.algorithms = vec![Algorithm::Md5];
    });
    let mut client = DigestClient::new("alice", "wonderland");
    let request = DigestRequest::new("REGISTER", "sip:example.com", b"");
    let challenges = header_values(&server.verify(T0, &request, &[], &users));
    assert!(!challenges[0].contains("qop"));
    let header = client.respond(AuthKind::Www, &refs(&challenges), &request, &[], "").unwrap();
    let creds: Credentials = header.value.parse().unwrap();
    assert_eq!((creds.qop, creds.nc, creds.cnonce), (None, None, None));
    assert_eq!(server.verify(T0, &request, &[value(&header)], &users), authorized("alice"));
    // Without nc a nonce is single-use: reuse draws a stale challenge, not acceptance.
    let reuse = client.authorize(&request, "");
    assert!(matches!(server.verify(T0, &request, &[value(&reuse[0])], &users), Outcome::Challenge { stale: true, .. }));
    // A strict server refuses the legacy response.
    let mut strict = server_with(|c| c.algorithms = vec![Algorithm::Md5]);
    assert_eq!(strict.verify(T0, &request, &[value(&header)], &users), Outcome::Rejected(Rejection::QopRequired));
}

#[test]
fn a_foreign_nonce_is_no_password_oracle() {
    // RFC 2617 §3.5's credentials (the math itself: `hash::tests::rfc2617_section_3_5_math`)
    // carry a nonce this server never issued. Right or wrong, the digest is not examined: both
    // draw a stale challenge, so a guesser that never received a challenge (a spoofed source,
    // say) learns nothing from the answer.
    let mut server = server_with(|c| {
        c.realm = "testrealm@host.com".into();
        c.algorithms = vec![Algorithm::Md5];
    });
    let store =
        |u: &str, _: &str, _: Algorithm| (u == "Mufasa").then(|| StoredSecret::Password("Circle Of Life".into()));
    let good = r#"Digest username="Mufasa", realm="testrealm@host.com", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", uri="/dir/index.html", qop=auth, nc=00000001, cnonce="0a4f113b", response="6629FAE49393A05397450978507C4EF1""#;
    let bad = good.replace("6629FAE4", "6629FAE5");
    assert!(matches!(server.verify(T0, &get_index(), &[good], &store), Outcome::Challenge { stale: true, .. }));
    assert!(matches!(server.verify(T0, &get_index(), &[&bad], &store), Outcome::Challenge { stale: true, .. }));
    // Nor are its other parameters: a spoofed request with a wrong `uri` or algorithm is not a
    // rejection that could be counted against the address it claims.
    let wrong_uri = good.replace("uri=\"/dir/index.html\"", "uri=\"/elsewhere\"");
    assert!(matches!(server.verify(T0, &get_index(), &[&wrong_uri], &store), Outcome::Challenge { stale: true, .. }));
    let wrong_algorithm = good.replace("qop=auth,", "algorithm=SHA-512-256, qop=auth,");
    assert!(matches!(
        server.verify(T0, &get_index(), &[&wrong_algorithm], &store),
        Outcome::Challenge { stale: true, .. } | Outcome::Rejected(Rejection::Malformed(_))
    ));
}

#[test]
fn a_nonce_issued_to_one_address_is_foreign_to_another() {
    let mut server = server();
    let users = |u: &str, _: &str, _: Algorithm| (u == "alice").then(|| StoredSecret::Password("wonderland".into()));
    let mut client = DigestClient::new("alice", "wonderland");
    let at = |client: &'static [u8]| DigestRequest::new("INVITE", "sip:bob@example.com", b"").from_client(client);
    let challenges = header_values(&server.verify(T0, &at(b"192.0.2.1"), &[], &users));
    let header = client.respond(AuthKind::Www, &refs(&challenges), &at(b"192.0.2.1"), &[], "c1").unwrap();
    // The same credentials sent from elsewhere (a spoofed source, a stolen nonce) are not
    // examined: a stale challenge, bound to the new address.
    assert!(matches!(
        server.verify(T0, &at(b"203.0.113.9"), &[value(&header)], &users),
        Outcome::Challenge { stale: true, .. }
    ));
    assert_eq!(server.verify(T0, &at(b"192.0.2.1"), &[value(&header)], &users), authorized("alice"));
}

#[test]
fn malformed_and_foreign_realm_credentials() {
    let mut server = server();
    let request = DigestRequest::new("INVITE", "sip:bob@example.com", b"");
    // Credentials for another realm (meant for the next hop) are ignored: challenge.
    let other = r#"Digest username="a", realm="other.net", nonce="n", uri="sip:bob@example.com", response="00""#;
    assert!(matches!(server.verify(T0, &request, &[other], &users), Outcome::Challenge { stale: false, .. }));
    let broken = r#"Digest username="a", realm="example.com", nonce="n"#;
    assert!(matches!(server.verify(T0, &request, &[broken], &users), Outcome::Rejected(Rejection::Malformed(_))));
    // An algorithm the server did not offer.
    let mut md5_only = server_with(|c| c.algorithms = vec![Algorithm::Md5]);
    let mut client = DigestClient::new("alice", "wonderland");
    let challenges = header_values(&server.verify(T0, &request, &[], &users));
    let sha = client.respond(AuthKind::Www, &refs(&challenges), &request, &[], "c").unwrap();
    assert_eq!(
        md5_only.verify(T0, &request, &[value(&sha)], &users),
        Outcome::Rejected(Rejection::AlgorithmNotOffered)
    );
    // opaque from some other server.
    let mut creds: Credentials = sha.value.parse().unwrap();
    creds.opaque = Some("not-ours".into());
    assert_eq!(
        server.verify(T0, &request, &[&creds.to_string()], &users),
        Outcome::Rejected(Rejection::OpaqueMismatch)
    );
}

#[test]
fn server_config_is_validated() {
    assert!(DigestServer::new(ServerConfig::new("example.com", b"short".to_vec()), T0).is_err());
    assert!(DigestServer::new(ServerConfig::new("", SECRET), T0).is_err());
    let mut no_alg = ServerConfig::new("example.com", SECRET);
    no_alg.algorithms.clear();
    assert_eq!(DigestServer::new(no_alg, T0).err(), Some(AuthError::InvalidConfig("no algorithm offered")));
}

#[test]
fn client_realm_restriction_and_unusable_challenges() {
    let mut client = DigestClient::new("alice", "wonderland").with_realm("example.com");
    let request = DigestRequest::new("INVITE", "sip:bob@example.com", b"");
    let foreign = r#"Digest realm="evil.example", nonce="n", qop="auth""#;
    assert_eq!(client.respond(AuthKind::Www, &[foreign], &request, &[], "c"), Err(AuthError::NoUsableChallenge));
    let sha512 = r#"Digest realm="example.com", nonce="n", qop="auth", algorithm=SHA-512-256"#;
    let basic = r#"Basic realm="example.com""#;
    assert_eq!(client.respond(AuthKind::Www, &[sha512, basic], &request, &[], "c"), Err(AuthError::NoUsableChallenge));
    let auth_conf = r#"Digest realm="example.com", nonce="n", qop="auth-conf""#;
    assert_eq!(client.respond(AuthKind::Www, &[auth_conf], &request, &[], "c"), Err(AuthError::NoUsableChallenge));
    let ok = r#"Digest realm="example.com", nonce="n", qop="auth""#;
    assert_eq!(client.respond(AuthKind::Www, &[ok], &request, &[], ""), Err(AuthError::InvalidCnonce));
    assert!(client.respond(AuthKind::Www, &[ok], &request, &[], "c").is_ok());
}

#[test]
fn sip_trunk_invite_407_round_trip() {
    // A carrier SBC challenging as a proxy; the UAC is a PBX trunk account.
    let mut sbc = server_with(|c| {
        c.realm = "trunk.example.com".into();
        c.kind = AuthKind::Proxy;
    });
    let accounts = |u: &str, r: &str, a: Algorithm| {
        (u == "pbx-01" && r == "trunk.example.com").then(|| StoredSecret::Ha1(ha1(a, u, r, "s3cr3t!")))
    };
    let mut uac = DigestClient::new("pbx-01", "s3cr3t!").with_realm("trunk.example.com");
    let ruri = "sip:+15551234567@trunk.example.com";
    let sdp = b"v=0\r\no=pbx 1 1 IN IP4 198.51.100.7\r\ns=-\r\nc=IN IP4 198.51.100.7\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0 101\r\n";
    let invite = DigestRequest::new("INVITE", ruri, sdp);

    // INVITE without credentials → 407.
    let outcome = sbc.verify(T0, &invite, &[], &accounts);
    assert_eq!(sbc.kind().status(), 407);
    assert_eq!(sbc.kind().challenge_header(), "Proxy-Authenticate");
    let proxy_authenticate = header_values(&outcome);

    // ACK the 407 (transaction layer), resend INVITE with CSeq+1 and Proxy-Authorization.
    let header = uac.respond(AuthKind::Proxy, &refs(&proxy_authenticate), &invite, &[], "a1b2c3d4").unwrap();
    assert_eq!(header.kind.credentials_header(), "Proxy-Authorization");
    assert!(header.value.starts_with(r#"Digest username="pbx-01", realm="trunk.example.com""#));
    assert!(header.value.contains(r#"uri="sip:+15551234567@trunk.example.com""#));
    assert_eq!(sbc.verify(T0 + 1, &invite, &[value(&header)], &accounts), authorized("pbx-01"));

    // 200 OK; later a re-INVITE (hold) and the BYE reuse the challenge: no second 407.
    let hold_sdp = b"v=0\r\no=pbx 1 2 IN IP4 198.51.100.7\r\ns=-\r\nc=IN IP4 198.51.100.7\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0 101\r\na=sendonly\r\n";
    let contact = "sip:+15551234567@203.0.113.20:5060;transport=udp";
    let reinvite = DigestRequest::new("INVITE", contact, hold_sdp);
    let reinvite_auth = uac.authorize(&reinvite, "e5f6a7b8");
    assert_eq!(reinvite_auth.len(), 1);
    assert_eq!(reinvite_auth[0].kind, AuthKind::Proxy);
    assert!(reinvite_auth[0].value.contains("nc=00000002"));
    assert_eq!(sbc.verify(T0 + 30, &reinvite, &[value(&reinvite_auth[0])], &accounts), authorized("pbx-01"));

    let bye = DigestRequest::new("BYE", contact, b"");
    let bye_auth = uac.authorize(&bye, "c9d0e1f2");
    assert!(bye_auth[0].value.contains("nc=00000003"));
    assert_eq!(sbc.verify(T0 + 90, &bye, &[value(&bye_auth[0])], &accounts), authorized("pbx-01"));
}

#[test]
fn preemptive_reuse_answered_with_fresh_nonce_is_retried() {
    // A server that rotates nonces without setting stale: after a reused nonce (nc > 1) the
    // client retries once rather than declaring the password wrong.
    let mut client = DigestClient::new("alice", "wonderland");
    let request = DigestRequest::new("BYE", "sip:bob@example.com", b"");
    let first = r#"Digest realm="example.com", nonce="n1", qop="auth""#;
    client.respond(AuthKind::Www, &[first], &request, &[], "c1").unwrap();
    let reused = client.authorize(&request, "c2");
    let second = r#"Digest realm="example.com", nonce="n2", qop="auth""#;
    let retry = client.respond(AuthKind::Www, &[second], &request, &[value(&reused[0])], "c3").unwrap();
    assert!(retry.value.contains(r#"nonce="n2""#) && retry.value.contains("nc=00000001"));
    // That answer drawing yet another challenge is a refusal.
    let third = r#"Digest realm="example.com", nonce="n3", qop="auth""#;
    assert!(matches!(
        client.respond(AuthKind::Www, &[third], &request, &[value(&retry)], "c4"),
        Err(AuthError::CredentialsRejected { .. })
    ));
    // The refused realm is forgotten, so no further preemptive credentials are sent.
    assert!(client.authorize(&request, "c5").is_empty());
}

#[test]
fn proxy_and_www_challenges_are_kept_apart() {
    let mut client = DigestClient::new("alice", "wonderland");
    let request = DigestRequest::new("INVITE", "sip:bob@example.com", b"");
    client
        .respond(AuthKind::Proxy, &[r#"Digest realm="proxy.example", nonce="p", qop="auth""#], &request, &[], "c")
        .unwrap();
    client
        .respond(AuthKind::Www, &[r#"Digest realm="example.com", nonce="w", qop="auth""#], &request, &[], "c")
        .unwrap();
    let headers = client.authorize(&request, "d");
    let kinds: Vec<AuthKind> = headers.iter().map(|h| h.kind).collect();
    assert_eq!(kinds, [AuthKind::Proxy, AuthKind::Www]);
    client.forget();
    assert!(client.authorize(&request, "d").is_empty());
}
