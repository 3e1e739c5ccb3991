//! The first exchange of a connection: hello (magic, protocol version, frame size) and
//! login. Nothing else is read before it is done, and it is bounded by one deadline (see
//! `session::serve`).

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use sharefs_protocol::{
    ClientMessage, ErrorBody, ErrorCode, Frame, FrameCodec, FrameError, ServerMessage, MAGIC,
    MIN_CLIENT_VERSION, MIN_FRAME, VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::Framed;

use crate::shared::Shared;

/// The refusal of a client speaking protocol `version`, saying which side to upgrade.
pub fn version_mismatch(version: u32) -> ErrorBody {
    let (side, command) = if version < MIN_CLIENT_VERSION {
        ("client", "sharefs --version")
    } else {
        ("server", "sharefs-server --version")
    };
    ErrorBody::new(
        ErrorCode::VersionMismatch,
        format!(
            "this server speaks sharefs protocol {VERSION} and the client {version}: \
             upgrade the {side} ({command})"
        ),
    )
}

/// Hello and login. Returns the user name, the password hash the login matched, the
/// client's id and when the server's `Hello` was sent (request deadlines count from it), or the error to send before closing.
pub(super) async fn handshake<S>(
    framed: &mut Framed<S, FrameCodec>,
    shared: &Shared,
    peer: SocketAddr,
) -> Result<(String, String, Option<u64>, Instant), ErrorBody>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let protocol = |m: &str| ErrorBody::new(ErrorCode::ProtocolError, m);
    let (max_frame, version) = match next_message(framed).await? {
        ClientMessage::Hello {
            magic,
            version,
            max_frame,
        } => {
            if magic != MAGIC {
                return Err(protocol("not a sharefs client"));
            }
            if !(MIN_CLIENT_VERSION..=VERSION).contains(&version) {
                if crate::ratelog::CONNECTIONS.allow() {
                    tracing::info!(version, "client speaks another protocol version");
                }
                return Err(version_mismatch(version));
            }
            // Never panics, whatever the configuration: at least the smallest frame a
            // chunk fits in, at most what the server allows.
            (
                max_frame.max(MIN_FRAME).min(shared.config.max_frame),
                version,
            )
        }
        _ => return Err(protocol("expected hello")),
    };
    let started = Instant::now();
    send(
        framed,
        &ServerMessage::Hello {
            magic: MAGIC.into(),
            // The client's own: an older client is served as it speaks.
            version,
            max_frame,
        },
    )
    .await?;
    framed.codec_mut().set_max_frame(max_frame);

    let (user, password, client) = match next_message(framed).await? {
        ClientMessage::Login {
            user,
            password,
            client,
        } => (user, password, client),
        _ => return Err(protocol("expected login")),
    };
    let (user, hash) = crate::login::login(shared, peer, user, password).await?;
    send(framed, &ServerMessage::LoginOk { user: user.clone() }).await?;
    Ok((user, hash, client, started))
}

async fn next_message<S>(framed: &mut Framed<S, FrameCodec>) -> Result<ClientMessage, ErrorBody>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match framed.next().await {
        Some(Ok(frame)) => frame
            .message()
            .map_err(|e| ErrorBody::new(ErrorCode::ProtocolError, e.to_string())),
        Some(Err(e)) => Err(frame_error_body(&e)),
        None => Err(ErrorBody::new(
            ErrorCode::ProtocolError,
            "connection closed",
        )),
    }
}

async fn send<S>(framed: &mut Framed<S, FrameCodec>, msg: &ServerMessage) -> Result<(), ErrorBody>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = Frame::new(msg, Bytes::new()).map_err(|e| frame_error_body(&e))?;
    framed.send(frame).await.map_err(|e| frame_error_body(&e))
}

pub(super) fn frame_error_body(e: &FrameError) -> ErrorBody {
    let code = match e {
        FrameError::TooLarge { .. } => ErrorCode::TooLarge,
        _ => ErrorCode::ProtocolError,
    };
    ErrorBody::new(code, e.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_version_mismatch_says_which_side_to_upgrade() {
        let old = super::version_mismatch(1).message;
        assert_eq!(
            old,
            "this server speaks sharefs protocol 3 and the client 1: upgrade the client (sharefs --version)"
        );
        let new = super::version_mismatch(4).message;
        assert!(new.contains("upgrade the server"), "{new}");
    }
}
