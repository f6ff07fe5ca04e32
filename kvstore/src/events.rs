//! The event stream: every transition appends to one Redis Stream in the same script that
//! changes the record. Each event carries a gap-free sequence number, so a reader that resumes
//! (after a reconnect or a restart) knows whether the stream was trimmed past its position, in
//! which case it gets [`EventBatch::FellBehind`] and must re-read full state.

use std::collections::HashMap;
use std::time::Duration;

use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};

use crate::Store;
use crate::error::{Error, Result};

/// A position in the event stream: the id of the last event consumed and its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Stream entry id (`0-0` before the first event).
    pub id: String,
    /// Sequence number of that event (0 before the first).
    pub seq: u64,
}

impl Position {
    /// Before every event.
    pub fn start() -> Position {
        Position { id: "0-0".into(), seq: 0 }
    }
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Stream entry id.
    pub id: String,
    /// Gap-free sequence number.
    pub seq: u64,
    /// What happened, e.g. `instance.ready`, `worker.lost`, `deployment.created`.
    pub kind: String,
    /// The deployment, worker, instance or role it happened to.
    pub entity: String,
    /// The other fields (model, worker, version, reason, ...).
    pub fields: HashMap<String, String>,
}

impl Event {
    /// A field other than seq, kind and id.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }

    /// When Redis appended it (ms since the epoch, by Redis's clock): the time part of its
    /// stream entry id. One clock for every event, whichever process caused it.
    pub fn time_ms(&self) -> Option<u64> {
        self.id.split_once('-').and_then(|(ms, _)| ms.parse().ok())
    }

    fn parse(key: &str, entry: &StreamId) -> Result<Event> {
        let text = |field: &str| -> Result<String> {
            let v = entry.map.get(field).ok_or_else(|| Error::Malformed {
                key: format!("{key} {}", entry.id),
                field: field.into(),
                reason: "missing".into(),
            })?;
            redis::from_redis_value::<String>(v.clone()).map_err(|e| Error::Malformed {
                key: format!("{key} {}", entry.id),
                field: field.into(),
                reason: e.to_string(),
            })
        };
        let seq_text = text("seq")?;
        let seq = seq_text.parse().map_err(|_| Error::Malformed {
            key: format!("{key} {}", entry.id),
            field: "seq".into(),
            reason: format!("{seq_text:?} is not a number"),
        })?;
        let mut fields = HashMap::new();
        for name in entry.map.keys() {
            if !matches!(name.as_str(), "seq" | "kind" | "id") {
                fields.insert(name.clone(), text(name)?);
            }
        }
        Ok(Event { id: entry.id.clone(), seq, kind: text("kind")?, entity: text("id")?, fields })
    }
}

/// What a read returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventBatch {
    /// The next events, in order, without a gap (possibly none if the wait ran out).
    Events(Vec<Event>),
    /// Events the reader had not consumed were trimmed away. The reader now stands at the
    /// current end of the stream (`resume`): re-read full state, then keep reading.
    FellBehind {
        /// Where the reader resumes.
        resume: Position,
    },
}

/// Reads the event stream from a position, on a connection of its own (blocking reads would
/// stall a shared one). Survives reconnects: a failed read leaves the position unchanged.
pub struct EventReader {
    store: Store,
    pos: Position,
    reader: BlockingReader,
}

impl Store {
    /// The current end of the event stream. A consumer takes this *before* reading full state,
    /// then reads events from it (re-applying a few is harmless: records carry versions).
    pub async fn event_position(&self) -> Result<Position> {
        let key = self.keys().events();
        let reply: StreamRangeReply = self
            .read(redis::cmd("XREVRANGE").arg(&key).arg("+").arg("-").arg("COUNT").arg(1))
            .await?;
        match reply.ids.first() {
            None => Ok(Position::start()),
            Some(entry) => {
                let e = Event::parse(&key, entry)?;
                Ok(Position { id: e.id, seq: e.seq })
            }
        }
    }

    /// A reader that returns the events after `from`.
    pub fn event_reader(&self, from: Position) -> EventReader {
        EventReader { store: self.clone(), pos: from, reader: BlockingReader::default() }
    }
}

impl EventReader {
    /// Where the reader stands.
    pub fn position(&self) -> &Position {
        &self.pos
    }

    /// The next events after the reader's position, at most `count`, waiting up to `block` for
    /// the first one (zero: do not wait).
    pub async fn next_batch(&mut self, block: Duration, count: usize) -> Result<EventBatch> {
        let key = self.store.keys().events();
        let entries = self.reader.read(&self.store, &key, &self.pos.id, count, block).await?;
        let mut events = Vec::with_capacity(entries.len());
        for entry in &entries {
            events.push(Event::parse(&key, entry)?);
        }
        if let Some(first) = events.first()
            && first.seq != self.pos.seq + 1
        {
            let resume = self.store.event_position().await?;
            self.pos = resume.clone();
            return Ok(EventBatch::FellBehind { resume });
        }
        if let Some(last) = events.last() {
            self.pos = Position { id: last.id.clone(), seq: last.seq };
        }
        Ok(EventBatch::Events(events))
    }
}

/// A blocking read must end before the connection's response timeout fires.
fn clamp_block(store: &Store, block: Duration) -> Duration {
    let limit = store.config().response_timeout.saturating_sub(Duration::from_millis(500));
    block.min(limit.max(Duration::from_millis(1)))
}

/// A connection of its own for blocking `XREAD`s of one stream (a blocked connection would
/// stall everything multiplexed on a shared one). Taken from the pool on first use, and again
/// after it broke.
#[derive(Default)]
pub(crate) struct BlockingReader {
    conn: Option<crate::conn::Conn>,
}

impl BlockingReader {
    /// Up to `count` entries of `key` after id `after`, waiting up to `block` for the first
    /// (zero: do not wait).
    pub(crate) async fn read(
        &mut self,
        store: &Store,
        key: &str,
        after: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<redis::streams::StreamId>> {
        let block = clamp_block(store, block);
        if self.conn.is_none() {
            self.conn = Some(store.inner.conns.dedicated().await?);
        }
        let Some(conn) = self.conn.as_mut() else { return Ok(Vec::new()) };
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(count.max(1));
        if !block.is_zero() {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        cmd.arg("STREAMS").arg(key).arg(after);
        let r: redis::RedisResult<Option<StreamReadReply>> = cmd.query_async(conn).await;
        match r {
            Ok(reply) => {
                Ok(reply.and_then(|r| r.keys.into_iter().next()).map(|k| k.ids).unwrap_or_default())
            }
            Err(e) => {
                // A blocking read that timed out may still hold its connection blocked: start
                // afresh rather than queue behind it.
                if crate::conn::is_broken(&e) || e.is_timeout() {
                    self.conn = None;
                }
                Err(Error::Redis(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_s_time_is_its_stream_id_s() {
        let event = |id: &str| Event {
            id: id.into(),
            seq: 1,
            kind: "instance.ready".into(),
            entity: "i1".into(),
            fields: HashMap::new(),
        };
        assert_eq!(event("1700000000123-4").time_ms(), Some(1_700_000_000_123));
        assert_eq!(event("not-an-id").time_ms(), None);
        assert_eq!(event("").time_ms(), None);
    }
}
