//! The coordinator's end of one node's session ([`crate::protocol`]): the
//! connection [`super::peers::Peers::open_session`] upgraded, read line
//! by line for the node's events, and written to, one signed line at a
//! time, for its commands.
//!
//! What a coordinator holds per node for a task is this: a socket, a line
//! buffer that starts at [`EVENT_BUFFER`] bytes, and the write half behind
//! a lock (the driver, the pings and the close share it). Nothing grows
//! with what a node sends but the line being read, bounded by
//! [`MAX_EVENT_LINE`].

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_util::codec::{FramedRead, LinesCodec};

use super::peers::PeerError;
use crate::peer_auth::LineSigner;
use crate::protocol::{NodeEvent, SessionCommand};

/// Longest event line accepted from a node.
const MAX_EVENT_LINE: usize = 1 << 20;
/// What a session's line buffer starts with (not the default 8 KiB).
const EVENT_BUFFER: usize = 512;

type Connection = reqwest::Upgraded;

/// A node's session: its events, and the way to send it commands.
/// Dropping it closes the connection, which ends the session on the node.
pub struct Session {
    events: FramedRead<ReadHalf<Connection>, LinesCodec>,
    commands: SessionCommands,
}

/// Sends one session's commands; clones share the connection.
#[derive(Clone)]
pub struct SessionCommands(Arc<Commands>);

struct Commands {
    node: String,
    /// How long a command's line may take to be written.
    timeout: Duration,
    writer: tokio::sync::Mutex<Writer>,
}

struct Writer {
    half: WriteHalf<Connection>,
    signer: LineSigner,
    /// A write failed or timed out, maybe half done: the stream is no
    /// longer in step, so nothing more is written to it.
    broken: Option<String>,
}

impl Session {
    /// `connection`, upgraded by the node, carries the session opened by
    /// a request signed with `open_nonce`; a command has `timeout` to be
    /// written.
    pub(super) fn new(
        node: &str,
        connection: Connection,
        secret: &str,
        open_nonce: &str,
        timeout: Duration,
    ) -> Session {
        let (read, write) = tokio::io::split(connection);
        Session {
            events: FramedRead::with_capacity(
                read,
                LinesCodec::new_with_max_length(MAX_EVENT_LINE),
                EVENT_BUFFER,
            ),
            commands: SessionCommands(Arc::new(Commands {
                node: node.to_string(),
                timeout,
                writer: tokio::sync::Mutex::new(Writer {
                    half: write,
                    signer: LineSigner::new(secret, open_nonce),
                    broken: None,
                }),
            })),
        }
    }

    pub fn node(&self) -> &str {
        &self.commands.0.node
    }

    pub fn commands(&self) -> &SessionCommands {
        &self.commands
    }

    /// The next event; `None` when the node closed the connection. An
    /// error says, in the node's name, what broke.
    pub async fn next(&mut self) -> Option<Result<NodeEvent, String>> {
        let line = self.events.next().await?;
        let node = self.node();
        Some(match line {
            Ok(l) => serde_json::from_str(&l).map_err(|e| {
                format!(
                    "{node} sent an event this node does not understand ({e}): {:?}",
                    l.chars().take(200).collect::<String>()
                )
            }),
            Err(e) => Err(format!("the connection to {node} broke: {e}")),
        })
    }

    /// End the session: tell the node, then wait (up to the command
    /// timeout) for it to close the connection, which it does once it has
    /// let go of its slot. Events still on the way are read and dropped.
    pub async fn close(mut self) -> Result<(), PeerError> {
        self.commands.send(&SessionCommand::Close).await?;
        let timeout = self.commands.0.timeout;
        let drained = async { while let Some(Ok(_)) = self.next().await {} };
        tokio::time::timeout(timeout, drained)
            .await
            .map_err(|_| PeerError::NoAnswer {
                node: self.node().to_string(),
                after: timeout,
            })
    }
}

impl SessionCommands {
    /// Write `command` to the node, within the command timeout.
    pub async fn send(&self, command: &SessionCommand) -> Result<(), PeerError> {
        let commands = &self.0;
        let broken = |reason: String| PeerError::Broken {
            node: commands.node.clone(),
            reason,
        };
        let json = serde_json::to_string(command).expect("commands serialize");
        let mut writer = commands.writer.lock().await;
        if let Some(reason) = &writer.broken {
            return Err(broken(reason.clone()));
        }
        let line = writer.signer.line(&json);
        let write = async {
            writer.half.write_all(line.as_bytes()).await?;
            writer.half.flush().await
        };
        let (reason, failed) = match tokio::time::timeout(commands.timeout, write).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => (e.to_string(), broken(e.to_string())),
            Err(_) => (
                format!(
                    "a command could not be written within {}",
                    super::peers::secs(commands.timeout)
                ),
                PeerError::NoAnswer {
                    node: commands.node.clone(),
                    after: commands.timeout,
                },
            ),
        };
        writer.broken = Some(reason);
        Err(failed)
    }
}
