//! `POST /api/v1/enroll` (issue 17, item 1): a host with no certificate enrolls with a join
//! token. It is the one change the HTTP door takes without a client certificate: the token is
//! the credential, checked by the daemon of a node that holds the CA key
//! (`daemon/enrollments.rs`). The answer is the certificate and what the host needs to join;
//! a refusal is `{"type":"error","code":…}` with a code per cause (`enroll::Refusal::code`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tokio::sync::oneshot;

use super::answer::{Answer, http_error};
use super::context::Ctx;
use super::extract::JsonBody;
use crate::api::socket::LocalCall;
use crate::enroll::{CHALLENGE_NONCE_BYTES, EnrollAsk, Refusal, signer_proof_message};
use crate::limits::HTTP_CALL_TIMEOUT;

pub(super) async fn enroll(State(ctx): State<Ctx>, JsonBody(ask): JsonBody<EnrollAsk>) -> Answer {
    let (reply, answered) = oneshot::channel();
    let call = LocalCall::Enroll { ask, remote: ctx.caller.remote, reply };
    let asked = async {
        ctx.door.calls.send(call).await.ok()?;
        answered.await.ok()
    };
    let answered = tokio::time::timeout(HTTP_CALL_TIMEOUT, asked).await;
    // Audited once the token is this cluster's (its MAC checked): a host that sends garbage is
    // counted in the metrics, not written to every node's audit log.
    let genuine = |outcome: &Result<_, Refusal>| match outcome {
        Ok(_) => true,
        Err(refusal) => matches!(refusal.code(), "token_expired" | "token_used_up" | "node_id"),
    };
    if let (Some(audit), Ok(Some(outcome))) = (&ctx.door.audit, &answered)
        && genuine(outcome)
    {
        let (detail, result) = match outcome {
            Ok(grant) => (format!("node {} (token {})", grant.node, grant.token_id), "ok".to_owned()),
            Err(refusal) => (refusal.to_string(), refusal.code().to_owned()),
        };
        let from = ctx.caller.remote.to_string();
        let record = crate::audit::unsealed("join token".to_owned(), from, "enroll", None, Some(detail), result);
        audit.record(record).await;
    }
    match answered {
        Ok(Some(Ok(grant))) => {
            let mut body = serde_json::to_value(&grant).unwrap_or_default();
            body["type"] = "enrolled".into();
            Ok((StatusCode::OK, axum::Json(body)).into_response())
        }
        Ok(Some(Err(refusal))) => Err(http_error(status_of(&refusal), refusal.code(), refusal.to_string())),
        Ok(None) => Err(http_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the daemon is stopping")),
        Err(_) => Err(http_error(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!("no answer from the daemon within {}s; ask again", HTTP_CALL_TIMEOUT.as_secs()),
        )),
    }
}

/// `POST /api/v1/enroll/challenge` `{nonce}`: a signer signs the host's nonce and its own
/// certificate with the CA key, so the host knows it sends its token to a signer (any node of
/// the cluster could otherwise pose as one).
pub(super) async fn challenge(State(ctx): State<Ctx>, JsonBody(asked): JsonBody<Challenge>) -> Answer {
    let Some((signer, cert)) = &ctx.door.signer else {
        return Err(http_error(StatusCode::SERVICE_UNAVAILABLE, "not_signer", Refusal::NotSigner.to_string()));
    };
    let nonce = STANDARD
        .decode(&asked.nonce)
        .ok()
        .filter(|nonce| nonce.len() == CHALLENGE_NONCE_BYTES)
        .ok_or_else(|| http_error(StatusCode::BAD_REQUEST, "bad_request", "nonce is not 32 bytes of base64"))?;
    let signature = signer
        .sign(&signer_proof_message(&nonce, cert.as_ref()))
        .map_err(|error| http_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", error.to_string()))?;
    let body = serde_json::json!({ "type": "signer_proof", "signature": STANDARD.encode(signature) });
    Ok((StatusCode::OK, axum::Json(body)).into_response())
}

/// The body of a challenge.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Challenge {
    /// 32 random bytes, base64.
    nonce: String,
}

fn status_of(refusal: &Refusal) -> StatusCode {
    match refusal {
        Refusal::Token(_) | Refusal::UsedUp { .. } => StatusCode::FORBIDDEN,
        Refusal::NodeTaken { .. } | Refusal::NodeMismatch { .. } => StatusCode::CONFLICT,
        Refusal::NoNodeId | Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
        Refusal::NotSigner | Refusal::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}
