//! Transaction matching keys (RFC 3261 §17.1.3 and §17.2.3).

use rsip::Method;
use rsip::headers::{ToTypedHeader, UntypedHeader};
use rsip::prelude::HeadersExt;

use super::TransactionError;

/// The magic cookie that marks an RFC 3261 branch (§8.1.1.7).
pub const MAGIC_COOKIE: &str = "z9hG4bK";

/// Matches a response to a client transaction: the top Via branch and the CSeq method
/// (§17.1.3). The method keeps a CANCEL, which shares its INVITE's branch (§9.1), apart.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientKey {
    branch: String,
    /// The method's name (rsip's `Method` does not implement `Hash`).
    method: String,
}

/// Matches a request to a server transaction (§17.2.3).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ServerKey {
    /// RFC 3261 peers: branch, sent-by, and the method with ACK folded into INVITE.
    Rfc3261 {
        /// Top Via branch.
        branch: String,
        /// Top Via sent-by, as written.
        sent_by: String,
        /// Request method (INVITE for an ACK).
        method: String,
    },
    /// RFC 2543 peers (no magic cookie): the fields §17.2.3 lists for backwards compatibility.
    Rfc2543 {
        /// Call-ID.
        call_id: String,
        /// From tag.
        from_tag: String,
        /// CSeq number.
        cseq: u32,
        /// Top Via, as written.
        via: String,
        /// Request method (INVITE for an ACK).
        method: String,
    },
}

fn bad(what: impl std::fmt::Display) -> TransactionError {
    TransactionError::BadMessage(what.to_string())
}

/// The method a request matches on: an ACK belongs to its INVITE's transaction.
fn matched_method(method: &Method) -> String {
    match method {
        Method::Ack => Method::Invite.to_string(),
        other => other.to_string(),
    }
}

fn top_via(message: &impl HeadersExt) -> Result<rsip::typed::Via, TransactionError> {
    message.via_header().map_err(|e| bad(format!("Via: {e}")))?.typed().map_err(|e| bad(format!("Via: {e}")))
}

fn cseq(message: &impl HeadersExt) -> Result<rsip::typed::CSeq, TransactionError> {
    message.cseq_header().map_err(|e| bad(format!("CSeq: {e}")))?.typed().map_err(|e| bad(format!("CSeq: {e}")))
}

impl ClientKey {
    /// The key of a request this endpoint sends.
    pub fn for_request(request: &rsip::Request) -> Result<Self, TransactionError> {
        let via = top_via(request)?;
        let branch = via.branch().ok_or_else(|| bad("top Via has no branch"))?.to_string();
        Ok(Self { branch, method: request.method.to_string() })
    }

    /// The key a received response matches (§17.1.3).
    pub fn for_response(response: &rsip::Response) -> Result<Self, TransactionError> {
        let via = top_via(response)?;
        let branch = via.branch().ok_or_else(|| bad("top Via has no branch"))?.to_string();
        Ok(Self { branch, method: cseq(response)?.method.to_string() })
    }
}

impl ServerKey {
    /// The key of a received request.
    pub fn for_request(request: &rsip::Request) -> Result<Self, TransactionError> {
        let via = top_via(request)?;
        let method = matched_method(&request.method);
        match via.branch().map(ToString::to_string) {
            Some(branch) if branch.starts_with(MAGIC_COOKIE) => {
                Ok(Self::Rfc3261 { branch, sent_by: via.uri.to_string(), method })
            }
            _ => {
                let from = request.from_header().map_err(|e| bad(format!("From: {e}")))?;
                let from_tag = from.tag().map_err(|e| bad(format!("From: {e}")))?.map(|t| t.to_string());
                Ok(Self::Rfc2543 {
                    call_id: request.call_id_header().map_err(|e| bad(format!("Call-ID: {e}")))?.value().to_owned(),
                    from_tag: from_tag.unwrap_or_default(),
                    cseq: cseq(request)?.seq,
                    via: request.via_header().map_err(|e| bad(format!("Via: {e}")))?.value().to_owned(),
                    method,
                })
            }
        }
    }

    /// The key of the INVITE a CANCEL cancels: same branch and sent-by, method INVITE (§9.2).
    pub fn invite_cancelled_by(cancel: &rsip::Request) -> Result<Self, TransactionError> {
        Ok(match Self::for_request(cancel)? {
            Self::Rfc3261 { branch, sent_by, .. } => {
                Self::Rfc3261 { branch, sent_by, method: Method::Invite.to_string() }
            }
            Self::Rfc2543 { call_id, from_tag, cseq, via, .. } => {
                Self::Rfc2543 { call_id, from_tag, cseq, via, method: Method::Invite.to_string() }
            }
        })
    }
}

/// Identifies the INVITE a 2xx-ACK acknowledges: Call-ID and CSeq number (§13.2.2.4 — the ACK
/// carries the INVITE's CSeq number).
pub(crate) fn dialog_ack_key(message: &impl HeadersExt) -> Result<(String, u32), TransactionError> {
    let call_id = message.call_id_header().map_err(|e| bad(format!("Call-ID: {e}")))?.value().to_owned();
    Ok((call_id, cseq(message)?.seq))
}
