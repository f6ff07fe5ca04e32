//! Per-worker command streams. Any service appends (start / stop / drain instance); whichever
//! registry replica holds the worker's session delivers them and, when the worker acknowledges,
//! advances the worker's cursor in Redis. A session that moves to another replica resumes
//! after the cursor: an unacknowledged command is delivered again (the worker recognises it by
//! its command id), an acknowledged one never is.

use std::time::Duration;

use redis::streams::{StreamId, StreamRangeReply};

use crate::Store;
use crate::error::{Error, Result};
use crate::events::BlockingReader;
use crate::names;
use crate::scripts::Arg;

/// One command in a worker's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandEntry {
    /// Stream entry id; acknowledge with it.
    pub stream_id: String,
    /// The command's own id.
    pub command_id: String,
    /// The encoded command.
    pub body: Vec<u8>,
}

impl CommandEntry {
    fn parse(key: &str, entry: &StreamId) -> Result<CommandEntry> {
        let get = |field: &str| -> Result<Vec<u8>> {
            let v = entry.map.get(field).ok_or_else(|| Error::Malformed {
                key: format!("{key} {}", entry.id),
                field: field.into(),
                reason: "missing".into(),
            })?;
            redis::from_redis_value::<Vec<u8>>(v.clone()).map_err(|e| Error::Malformed {
                key: format!("{key} {}", entry.id),
                field: field.into(),
                reason: e.to_string(),
            })
        };
        Ok(CommandEntry {
            stream_id: entry.id.clone(),
            command_id: String::from_utf8_lossy(&get("cid")?).into_owned(),
            body: get("body")?,
        })
    }
}

/// Reads one worker's commands with blocking waits, on a connection of its own.
pub struct CommandReader {
    store: Store,
    worker: String,
    after: String,
    reader: BlockingReader,
}

impl Store {
    /// Appends a command to a worker's stream. Returns its stream id.
    pub async fn send_command(
        &self,
        worker: &str,
        command_id: &str,
        body: &[u8],
    ) -> Result<String> {
        names::validate_id("worker_id", worker)?;
        names::validate_id("command_id", command_id)?;
        let reply = self
            .run_ok(
                "command_send",
                &self.scripts().command_send,
                &[Arg::Str(worker), Arg::Str(command_id), Arg::Bytes(body)],
            )
            .await?;
        Ok(reply.str(0)?.to_string())
    }

    /// The id of the worker's last acknowledged command (`0-0` if none).
    pub async fn command_cursor(&self, worker: &str) -> Result<String> {
        names::validate_id("worker_id", worker)?;
        let cursor: Option<String> =
            self.read(redis::cmd("GET").arg(self.keys().commands_acked(worker))).await?;
        Ok(cursor.unwrap_or_else(|| "0-0".into()))
    }

    /// Up to `count` commands after stream id `after`, without waiting.
    pub async fn read_commands(
        &self,
        worker: &str,
        after: &str,
        count: usize,
    ) -> Result<Vec<CommandEntry>> {
        names::validate_id("worker_id", worker)?;
        names::validate_stream_id("after", after)?;
        let key = self.keys().commands(worker);
        let reply: StreamRangeReply = self
            .read(
                redis::cmd("XRANGE")
                    .arg(&key)
                    .arg(format!("({after}"))
                    .arg("+")
                    .arg("COUNT")
                    .arg(count.max(1)),
            )
            .await?;
        reply.ids.iter().map(|e| CommandEntry::parse(&key, e)).collect()
    }

    /// Records that the worker handled every command up to `stream_id`. Returns false if that
    /// was already acknowledged (the cursor never moves back).
    pub async fn ack_command(&self, worker: &str, stream_id: &str) -> Result<bool> {
        names::validate_id("worker_id", worker)?;
        names::validate_stream_id("stream_id", stream_id)?;
        let reply = self
            .run_ok(
                "command_ack",
                &self.scripts().command_ack,
                &[Arg::Str(worker), Arg::Str(stream_id)],
            )
            .await?;
        Ok(reply.code == "ok")
    }

    /// A blocking reader of the worker's commands, starting after its acknowledged cursor.
    pub async fn command_reader(&self, worker: &str) -> Result<CommandReader> {
        let after = self.command_cursor(worker).await?;
        Ok(CommandReader {
            store: self.clone(),
            worker: worker.to_string(),
            after,
            reader: BlockingReader::default(),
        })
    }
}

/// Reads the stream that says which workers' command streams grew, so one blocking connection
/// serves every session a registry replica holds.
pub struct NotifyReader {
    store: Store,
    after: String,
    reader: BlockingReader,
}

impl Store {
    /// A reader of command notifications appended from now on.
    pub async fn command_notify_reader(&self) -> Result<NotifyReader> {
        let reply: StreamRangeReply = self
            .read(
                redis::cmd("XREVRANGE")
                    .arg(self.keys().commands_notify())
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1),
            )
            .await?;
        let after = reply.ids.first().map(|e| e.id.clone()).unwrap_or_else(|| "0-0".into());
        Ok(NotifyReader { store: self.clone(), after, reader: BlockingReader::default() })
    }
}

impl NotifyReader {
    /// Ids of workers with new commands since the last call (each once), waiting up to `block`.
    pub async fn next(&mut self, block: Duration) -> Result<Vec<String>> {
        let key = self.store.keys().commands_notify();
        let entries = self.reader.read(&self.store, &key, &self.after, 1000, block).await?;
        let mut workers: Vec<String> = Vec::new();
        for e in &entries {
            if let Some(Ok(w)) =
                e.map.get("worker").map(|v| redis::from_redis_value::<String>(v.clone()))
                && !workers.contains(&w)
            {
                workers.push(w);
            }
        }
        if let Some(last) = entries.last() {
            self.after = last.id.clone();
        }
        Ok(workers)
    }
}

impl CommandReader {
    /// The next commands not yet returned by this reader, waiting up to `block` for one.
    pub async fn next(&mut self, block: Duration, count: usize) -> Result<Vec<CommandEntry>> {
        let key = self.store.keys().commands(&self.worker);
        let entries = self.reader.read(&self.store, &key, &self.after, count, block).await?;
        let out: Vec<CommandEntry> =
            entries.iter().map(|e| CommandEntry::parse(&key, e)).collect::<Result<_>>()?;
        if let Some(last) = out.last() {
            self.after = last.stream_id.clone();
        }
        Ok(out)
    }
}
