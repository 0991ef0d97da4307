//! Slowing password guessing down: failed digest attempts throttled per source and per user.
//!
//! A digest exchange answers a guess in one round trip, so a scanner (sipvicious `svcrack`)
//! tries thousands of passwords a minute against a server that only checks them. Two limits
//! make a 10,000-word dictionary take days instead:
//!
//! - **Per source** (an IPv4 address, an IPv6 /64 — one host however many addresses it takes):
//!   [`ThrottleConfig::free_failures`] failures pass; each one after that blocks the source for
//!   twice as long as the last (1 s, 2 s, 4 s … up to [`ThrottleConfig::max_block`]), and a
//!   blocked source's attempts are refused without being checked — a right password from it
//!   is refused too, so the guesser learns nothing while blocked — except for a user that
//!   authenticated from that address before (one phone with an old password does not lock out
//!   the rest of an office behind the same NAT). A source's failures are forgotten
//!   [`ThrottleConfig::forget_after`] after its last failure or block; authenticating (as
//!   whoever) does not wash them out.
//! - **Per user**: a bucket of [`ThrottleConfig::user_burst`] failures refilled one per
//!   [`ThrottleConfig::user_refill`]. With it empty, an attempt on that user is refused
//!   unchecked — unless it comes from an address that user authenticated from before, or from
//!   one with no failure on record: the real user's phone keeps working, and so does the real
//!   user on a fresh address, while a guesser spread over many addresses gets one guess per
//!   address it burns (RFC 3261 §26.2.3 leaves this to the server; the trade-off is stated
//!   in docs/security.md).
//!
//! Only users the credential store knows get a bucket: the table is as large as the
//! configuration, not as the names strangers try. Unknown users count per source only, and
//! both kinds are refused the same way, so the throttle tells no one which users exist.
//!
//! Spoofed sources cannot lock a victim out: a guess counts only after the server checked it,
//! and with nonces bound to the source ([`super::DigestRequest::from_client`]) a guess from
//! an address that never received a challenge is not checked.
//!
//! Sources live in a fixed table of [`SOURCE_SLOTS`] records chosen by a keyed hash, allocated
//! at the first failure and never grown: a flood of failures from many addresses evicts older
//! records (the newest wins a slot) but holds no more memory.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::hash;

/// Records in the source table (16,384 × 48 bytes: 768 KiB once a failure happened).
pub const SOURCE_SLOTS: usize = 16_384;

/// How hard guessing is made. The defaults let a mistyped password be retried a few times
/// and make a dictionary attack from one address take an hour per guess after the first
/// seventeen (10,000 words: over a year), and one on one user from addresses that failed
/// before take a minute per guess after the first ten.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ThrottleConfig {
    /// Failures a source may have before it is blocked. Default: 5.
    pub free_failures: u32,
    /// The longest block. Default: one hour.
    pub max_block: Duration,
    /// A source's failures are forgotten after this long without one once its block is over.
    /// Default: one day.
    pub forget_after: Duration,
    /// Failures on one user before its bucket is empty. Default: 10.
    pub user_burst: u32,
    /// One failure comes back to a user's bucket per this long. Default: 60 s.
    pub user_refill: Duration,
    /// Addresses remembered per user as ones it authenticated from. Default: 8.
    pub known_sources: usize,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            free_failures: 5,
            max_block: Duration::from_secs(3_600),
            forget_after: Duration::from_secs(24 * 3_600),
            user_burst: 10,
            user_refill: Duration::from_secs(60),
            known_sources: 8,
        }
    }
}

/// Whether an attempt may be checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Check the credentials, then report [`GuessThrottle::failed`] or
    /// [`GuessThrottle::succeeded`].
    Check,
    /// Refuse without checking (as a wrong password is refused: the peer cannot tell).
    Refuse,
}

/// An IPv4 address, or an IPv6 address's /64: what one host controls, as a throttle key.
pub fn source_prefix(source: IpAddr) -> u128 {
    match source.to_canonical() {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => (u128::from(v6) >> 64 << 64) | 1,
    }
}

#[derive(Debug, Clone, Copy)]
struct SourceRecord {
    source: u128,
    failures: u32,
    last_failure: Instant,
    blocked_until: Option<Instant>,
}

#[derive(Debug)]
struct UserRecord {
    tokens: f64,
    refilled: Instant,
    /// Sources it authenticated from, most recent last.
    known: VecDeque<u128>,
}

/// Failed digest attempts per source and per user (see the module docs). Sans-IO: time is an
/// input, and the hash key comes from the caller's CSPRNG.
#[derive(Debug)]
pub struct GuessThrottle {
    config: ThrottleConfig,
    key: [u8; 32],
    sources: Vec<Option<SourceRecord>>,
    users: HashMap<String, UserRecord>,
    refused: u64,
}

impl GuessThrottle {
    /// A throttle whose source table is placed by a hash keyed with `key` (draw it at random:
    /// with a known key an attacker could pick addresses that evict a victim's record).
    pub fn new(config: ThrottleConfig, key: [u8; 32]) -> Self {
        Self { config, key, sources: Vec::new(), users: HashMap::new(), refused: 0 }
    }

    /// Attempts refused unchecked so far.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Whether an attempt from `source` on `user` (`None` without credentials;
    /// `known_user`: the store has this user) may be checked.
    pub fn check(&mut self, now: Instant, source: IpAddr, user: Option<&str>, known_user: bool) -> Verdict {
        let source = source_prefix(source);
        let record = self.source(source).copied();
        // The user's own address (it authenticated from it before) is not blocked by others'
        // failures there: one phone with an old password does not lock out a whole office NAT.
        let own_address = user.and_then(|u| self.users.get(u)).is_some_and(|r| r.known.contains(&source));
        if !own_address && record.and_then(|r| r.blocked_until).is_some_and(|until| now < until) {
            self.refused += 1;
            return Verdict::Refuse;
        }
        let has_failed = record.is_some_and(|r| r.failures > 0 && !forgotten(&self.config, &r, now));
        if let (Some(user), true, true) = (user, known_user, has_failed) {
            let (burst, refill) = (self.config.user_burst, self.config.user_refill);
            if let Some(record) = self.users.get_mut(user) {
                refill_bucket(record, now, burst, refill);
                if record.tokens < 1.0 && !record.known.contains(&source) {
                    self.refused += 1;
                    return Verdict::Refuse;
                }
            }
        }
        Verdict::Check
    }

    /// The credentials were checked and were wrong.
    pub fn failed(&mut self, now: Instant, source: IpAddr, user: Option<&str>, known_user: bool) {
        let key = source_prefix(source);
        let slot = self.slot(key);
        let config = self.config.clone();
        let table = self.table();
        let record = match &mut table[slot] {
            Some(r) if r.source == key && !forgotten(&config, r, now) => r,
            // Empty, forgotten, or another source's: the newest failure takes the slot.
            other => other.insert(SourceRecord { source: key, failures: 0, last_failure: now, blocked_until: None }),
        };
        record.failures = record.failures.saturating_add(1);
        record.last_failure = now;
        let over = record.failures.saturating_sub(config.free_failures);
        if over > 0 {
            let block = Duration::from_secs(1u64 << (over - 1).min(20)).min(config.max_block);
            record.blocked_until = Some(now + block);
        }
        if let (Some(user), true) = (user, known_user) {
            let (burst, refill) = (self.config.user_burst, self.config.user_refill);
            let record = self.users.entry(user.to_owned()).or_insert_with(|| UserRecord {
                tokens: f64::from(burst),
                refilled: now,
                known: VecDeque::new(),
            });
            refill_bucket(record, now, burst, refill);
            record.tokens = (record.tokens - 1.0).max(0.0);
        }
    }

    /// The credentials were checked and were right: the source becomes one of the user's known
    /// addresses (its failures stand: an account of one's own must not wash out guesses at
    /// someone else's).
    pub fn succeeded(&mut self, now: Instant, source: IpAddr, user: &str) {
        let key = source_prefix(source);
        let (burst, limit) = (self.config.user_burst, self.config.known_sources);
        let record = self.users.entry(user.to_owned()).or_insert_with(|| UserRecord {
            tokens: f64::from(burst),
            refilled: now,
            known: VecDeque::new(),
        });
        record.known.retain(|k| *k != key);
        record.known.push_back(key);
        while record.known.len() > limit {
            record.known.pop_front();
        }
    }

    fn slot(&self, source: u128) -> usize {
        let digest = hash::hmac_sha256(&self.key, &[&source.to_be_bytes()]);
        let mut word = [0u8; 8];
        word.copy_from_slice(&digest[..8]);
        (u64::from_be_bytes(word) % SOURCE_SLOTS as u64) as usize
    }

    fn source(&self, source: u128) -> Option<&SourceRecord> {
        self.sources.get(self.slot(source)).and_then(Option::as_ref).filter(|r| r.source == source)
    }

    fn table(&mut self) -> &mut [Option<SourceRecord>] {
        if self.sources.is_empty() {
            self.sources = vec![None; SOURCE_SLOTS];
        }
        &mut self.sources
    }
}

/// Whether a source's failures are past: `forget_after` since its last failure or the end of
/// its block, whichever is later (else a block as long as the memory would wipe it).
fn forgotten(config: &ThrottleConfig, record: &SourceRecord, now: Instant) -> bool {
    let since = record.blocked_until.map_or(record.last_failure, |until| until.max(record.last_failure));
    now.saturating_duration_since(since) > config.forget_after
}

fn refill_bucket(record: &mut UserRecord, now: Instant, burst: u32, refill: Duration) {
    let elapsed = now.saturating_duration_since(record.refilled);
    let gained = if refill.is_zero() { f64::from(burst) } else { elapsed.as_secs_f64() / refill.as_secs_f64() };
    record.tokens = (record.tokens + gained).min(f64::from(burst));
    record.refilled = now;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    /// How long a dictionary of `words` takes from one address, guessing as fast as allowed.
    fn time_to_try(throttle: &mut GuessThrottle, start: Instant, words: u32, from: IpAddr) -> Duration {
        let (mut now, mut tried) = (start, 0);
        while tried < words {
            if throttle.check(now, from, Some("alice"), true) == Verdict::Check {
                throttle.failed(now, from, Some("alice"), true);
                tried += 1;
            } else {
                now += Duration::from_secs(60);
            }
        }
        now - start
    }

    #[test]
    fn a_dictionary_from_one_address_takes_hours_not_seconds() {
        let mut throttle = GuessThrottle::new(ThrottleConfig::default(), [7; 32]);
        let took = time_to_try(&mut throttle, Instant::now(), 1_000, ip("203.0.113.9"));
        // 1,000 words (10,000 would only take ten times longer, a simulated year).
        assert!(took > Duration::from_secs(24 * 3_600 * 30), "1,000 guesses took {took:?}");
    }

    #[test]
    fn a_blocked_source_is_refused_even_with_the_right_password_and_others_are_not() {
        let mut throttle = GuessThrottle::new(ThrottleConfig::default(), [7; 32]);
        let (now, attacker, phone) = (Instant::now(), ip("203.0.113.9"), ip("198.51.100.20"));
        throttle.succeeded(now, phone, "alice");
        for _ in 0..6 {
            assert_eq!(throttle.check(now, attacker, Some("alice"), true), Verdict::Check);
            throttle.failed(now, attacker, Some("alice"), true);
        }
        assert_eq!(throttle.check(now, attacker, Some("alice"), true), Verdict::Refuse);
        assert_eq!(throttle.check(now, attacker, None, false), Verdict::Refuse, "blocked whatever it sends");
        // Alice's own phone is not locked out by the attack on her name.
        assert_eq!(throttle.check(now, phone, Some("alice"), true), Verdict::Check);
        // Authenticating as someone else from the attacker's address washes nothing out.
        throttle.succeeded(now, attacker, "mallory");
        assert_eq!(throttle.check(now, attacker, Some("alice"), true), Verdict::Refuse);
        // Bob, who authenticated from the same (shared, NAT'd) address before, is not blocked
        // by the failures there.
        let mut shared = GuessThrottle::new(ThrottleConfig::default(), [7; 32]);
        shared.succeeded(now, attacker, "bob");
        for _ in 0..6 {
            shared.failed(now, attacker, Some("alice"), true);
        }
        assert_eq!(shared.check(now, attacker, Some("alice"), true), Verdict::Refuse);
        assert_eq!(shared.check(now, attacker, Some("bob"), true), Verdict::Check);
        // The block ends (1 s for the first failure over the free five).
        assert_eq!(throttle.check(now + Duration::from_secs(2), attacker, Some("alice"), true), Verdict::Check);
    }

    #[test]
    fn guesses_spread_over_many_addresses_are_limited_per_user() {
        let mut throttle = GuessThrottle::new(ThrottleConfig::default(), [7; 32]);
        let now = Instant::now();
        let mut checked = 0;
        // 1,000 bots, each failing twice: under the per-source block.
        for bot in 0..1_000u32 {
            let from = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + bot));
            for _ in 0..2 {
                if throttle.check(now, from, Some("alice"), true) == Verdict::Check {
                    throttle.failed(now, from, Some("alice"), true);
                    checked += 1;
                }
            }
        }
        // Each bot's first guess is checked (it has no failure yet), its second only while the
        // bucket's ten last (five bots' seconds): 1,000 + 5, not 2,000.
        assert_eq!(checked, 1_005);
        // A fresh address with the right password still gets checked: the real user on a new
        // network is not locked out.
        assert_eq!(throttle.check(now, ip("192.0.2.44"), Some("alice"), true), Verdict::Check);
        // Another user is untouched.
        assert_eq!(throttle.check(now, ip("10.0.0.1"), Some("bob"), true), Verdict::Check);
    }

    #[test]
    fn unknown_users_get_no_record_and_are_throttled_per_source_alike() {
        let mut throttle = GuessThrottle::new(ThrottleConfig::default(), [7; 32]);
        let (now, from) = (Instant::now(), ip("203.0.113.9"));
        for n in 0..6 {
            throttle.failed(now, from, Some(&format!("user{n}")), false);
        }
        assert!(throttle.users.is_empty(), "names strangers try hold no memory");
        assert_eq!(throttle.check(now, from, Some("nobody"), false), Verdict::Refuse);
        assert_eq!(throttle.check(now, from, Some("alice"), true), Verdict::Refuse, "same answer for a real user");
    }

    #[test]
    fn an_ipv6_host_is_one_source_and_failures_are_forgotten() {
        let mut throttle = GuessThrottle::new(ThrottleConfig::default(), [7; 32]);
        let now = Instant::now();
        for n in 0..6u16 {
            throttle.failed(now, IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, n]), None, false);
        }
        assert_eq!(throttle.check(now, ip("2001:db8::ffff"), None, false), Verdict::Refuse);
        let later = now + Duration::from_secs(26 * 3_600);
        assert_eq!(throttle.check(later, ip("2001:db8::ffff"), None, false), Verdict::Check);
        throttle.failed(later, ip("2001:db8::ffff"), None, false);
        assert_eq!(throttle.check(later, ip("2001:db8::ffff"), None, false), Verdict::Check, "counting starts over");
    }
}
