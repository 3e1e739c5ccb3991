//! Login: what a client that has not proven anything yet can make the server do, bounded.
//!
//! [`login`] is the one entry point, called by the handshake with the user name and
//! password the client sent. In order:
//! - a user name that breaks the name rules (at most 32 bytes) or a password over
//!   [`MAX_PASSWORD`] is refused at once, before anything is stored or verified, and is
//!   never logged in full;
//! - the throttle counts the attempt (see [`crate::throttle`]) or refuses it;
//! - the password is verified with at most one argon2 check per core at a time (each takes
//!   tens of MiB and milliseconds); more attempts wait for a turn, already counted;
//! - failures are answered after the throttle's delay, and logged within [`LOG_PER_SECOND`]
//!   lines a second (a summary counts the rest).

use std::net::SocketAddr;
use std::sync::Arc;

use sharefs_protocol::name::{check_user_name, MAX_USER_NAME};
use sharefs_protocol::{ErrorBody, ErrorCode, Event, MAX_PASSWORD};
use tokio::sync::Semaphore;

use crate::error::ServerError;
use crate::metrics::LoginOutcome;
use crate::ratelog::RateLog;
use crate::shared::Shared;
use crate::throttle::{LoginPolicy, LoginThrottle, Refusal};

/// Log lines for failed and refused logins, per second, all clients together.
pub const LOG_PER_SECOND: u32 = 10;

/// The login state shared by all connections.
#[derive(Debug)]
pub struct Logins {
    throttle: LoginThrottle,
    /// Password checks running at once: one per core.
    checks: Arc<Semaphore>,
    log: RateLog,
}

impl Logins {
    pub fn new(policy: LoginPolicy) -> Logins {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Logins {
            throttle: LoginThrottle::new(policy),
            checks: Arc::new(Semaphore::new(cores)),
            log: RateLog::new("login failures", LOG_PER_SECOND),
        }
    }
}

enum Outcome {
    /// Logged in with the password of this hash.
    Ok(String),
    Registered(String),
    Failed,
}

/// Checks a login; the user name and the password hash it matched (the session is bound
/// to it) on success, the error to send before closing otherwise.
pub async fn login(
    shared: &Shared,
    peer: SocketAddr,
    user: String,
    password: String,
) -> Result<(String, String), ErrorBody> {
    let logins = &shared.logins;
    if let Err(why) = check_user_name(&user) {
        if logins.log.allow() {
            // The name may be megabytes of anything: its length and a quoted start only.
            let start: String = user.chars().take(MAX_USER_NAME).collect();
            tracing::warn!(%peer, len = user.len(), start = ?start, "login refused: invalid user name");
        }
        shared.metrics.login(LoginOutcome::Failed);
        let why = if user.len() > MAX_USER_NAME {
            format!("user name longer than {MAX_USER_NAME} bytes")
        } else {
            why
        };
        return Err(ErrorBody::new(ErrorCode::InvalidName, why));
    }
    if password.len() > MAX_PASSWORD {
        if logins.log.allow() {
            tracing::warn!(%peer, user, len = password.len(), "login refused: password too long");
        }
        shared.metrics.login(LoginOutcome::Failed);
        return Err(ErrorBody::new(
            ErrorCode::TooLarge,
            format!("password longer than {MAX_PASSWORD} bytes"),
        ));
    }
    loop {
        // Enabled before the attempt, so a decision in between is not missed.
        let turn = logins.throttle.turn();
        tokio::pin!(turn);
        turn.as_mut().enable();
        match logins.throttle.attempt(peer.ip(), &user) {
            Ok(()) => break,
            // Within the handshake's deadline, which bounds the whole login.
            Err(Refusal::Wait) => turn.await,
            Err(Refusal::Locked(wait)) => {
                if logins.log.allow() {
                    tracing::warn!(%peer, user, "login refused: too many failures");
                }
                shared.metrics.login(LoginOutcome::Throttled);
                return Err(ErrorBody::new(
                    ErrorCode::Throttled,
                    format!(
                        "too many failed logins; try again in {} s",
                        wait.as_secs().max(1)
                    ),
                ));
            }
        }
    }
    let outcome = match check(shared, user.clone(), password).await {
        Ok(outcome) => outcome,
        Err(e) => {
            // Not the client's fault: its attempt is taken back.
            logins.throttle.withdraw(peer.ip(), &user);
            return Err(e);
        }
    };
    let hash = match outcome {
        Outcome::Ok(hash) => {
            logins.throttle.succeeded(peer.ip(), &user);
            hash
        }
        Outcome::Registered(hash) => {
            logins.throttle.succeeded(peer.ip(), &user);
            tracing::info!(%peer, user, "account created by open registration");
            shared.hub.broadcast(Event::UsersChanged);
            hash
        }
        Outcome::Failed => {
            shared.metrics.login(LoginOutcome::Failed);
            let delay = logins.throttle.failed(peer.ip(), &user);
            if logins.log.allow() {
                tracing::warn!(%peer, user, ?delay, "login failed");
            }
            tokio::time::sleep(delay).await;
            return Err(ErrorBody::new(
                ErrorCode::AuthFailed,
                "unknown user or wrong password",
            ));
        }
    };
    shared.metrics.login(LoginOutcome::Ok);
    tracing::info!(%peer, user, "logged in");
    Ok((user, hash))
}

/// Verifies the password (or registers the account), waiting for a free password check.
async fn check(shared: &Shared, name: String, password: String) -> Result<Outcome, ErrorBody> {
    let internal = |e: String| ErrorBody::new(ErrorCode::Internal, e);
    let permit = shared
        .logins
        .checks
        .clone()
        .acquire_owned()
        .await
        .map_err(|e| internal(e.to_string()))?;
    let users = shared.users.clone();
    let register = shared.config.open_registration;
    tokio::task::spawn_blocking(move || -> Result<Outcome, ServerError> {
        let _permit = permit;
        if let Some(hash) = users.login(&name, &password)? {
            return Ok(Outcome::Ok(hash));
        }
        if register && users.get(&name)?.is_none() {
            if password.is_empty() {
                return Ok(Outcome::Failed);
            }
            users.add(&name, &password, None)?;
            return Ok(match users.login(&name, &password)? {
                Some(hash) => Outcome::Registered(hash),
                None => Outcome::Failed,
            });
        }
        Ok(Outcome::Failed)
    })
    .await
    .map_err(|e| internal(e.to_string()))?
    .map_err(|e| e.body())
}
