//! The Lua transitions in `lua/`, each prefixed with what it uses of `lua/_prelude.lua`, and the
//! one way they are run: EVALSHA with a fallback to loading the script when Redis answers
//! NOSCRIPT (after a restart or on a fresh cluster node).

use redis::Script;

use crate::error::{Error, Result};
use crate::{Store, names};

macro_rules! lua {
    ($file:literal) => {
        Script::new(&assemble(PRELUDE, include_str!(concat!("../../lua/", $file, ".lua"))))
    };
}

/// The prelude, for tests that check the Lua key builder against [`crate::Keys`].
pub const PRELUDE: &str = include_str!("../../lua/_prelude.lua");

/// One top-level definition of the prelude: a `local` (value or function) or one entry of the
/// key table `K`, with the comment lines just above it.
struct Definition<'a> {
    /// How a script refers to it: the local's name, or `K.<entry>`.
    name: String,
    /// Its lines (0-based, inclusive) in the prelude.
    lines: std::ops::RangeInclusive<usize>,
    text: Vec<&'a str>,
}

/// The script Redis runs for `body`: the prelude's definitions `body` uses, directly or through
/// another definition, in the prelude's order, then `body`.
///
/// Redis keeps nothing from one call of a script to the next, so the prelude's key names and
/// helpers are built anew on every call; carrying all of them would cost each call the ~30 key
/// names and closures most scripts never touch (measured: about a fifth of a heartbeat's time
/// inside Redis). The prelude keeps to a shape this relies on: every `local` starts a line,
/// a function's closing `end` and the key table's closing `}` stand alone at the start of a
/// line (as does that of any other table spanning lines), each key-table entry is one line, and
/// nothing reaches a key entry but as `K.<entry>`.
fn assemble(prelude: &str, body: &str) -> String {
    let lines: Vec<&str> = prelude.lines().collect();
    let mut definitions: Vec<Definition> = Vec::new();
    let mut comment_from: Option<usize> = None;
    let mut in_keys = false;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let from = comment_from.unwrap_or(i);
        let one = |name: String, end: usize| Definition {
            name,
            lines: from..=end,
            text: lines[from..=end].to_vec(),
        };
        if in_keys {
            if line == "}" {
                in_keys = false;
            } else if let Some((entry, _)) = line.trim_start().split_once(" = ") {
                definitions.push(one(format!("K.{entry}"), i));
            }
            comment_from = None;
        } else if line.starts_with("--") {
            comment_from.get_or_insert(i);
        } else if line == "local K = {" {
            in_keys = true;
            comment_from = None;
        } else if let Some(rest) = line.strip_prefix("local function ") {
            let name = rest.split('(').next().unwrap_or_default().to_string();
            let end = (i..lines.len()).find(|&j| lines[j] == "end").unwrap_or(lines.len() - 1);
            definitions.push(one(name, end));
            comment_from = None;
            i = end;
        } else if let Some(rest) = line.strip_prefix("local ").filter(|_| line.ends_with('{')) {
            // A table spanning lines, up to its closing `}` alone at the start of a line.
            let name = rest.split([' ', '=']).next().unwrap_or_default().to_string();
            let end = (i..lines.len()).find(|&j| lines[j] == "}").unwrap_or(lines.len() - 1);
            definitions.push(one(name, end));
            comment_from = None;
            i = end;
        } else if let Some(rest) = line.strip_prefix("local ") {
            let name = rest.split([' ', '=']).next().unwrap_or_default().to_string();
            definitions.push(one(name, i));
            comment_from = None;
        } else {
            comment_from = None;
        }
        i += 1;
    }

    // What the body uses, then what that uses, until nothing new is found.
    let mut used = vec![false; definitions.len()];
    let mut reach = vec![body.to_string()];
    while let Some(text) = reach.pop() {
        for (d, u) in definitions.iter().zip(used.iter_mut()) {
            if !*u && refers_to(&text, &d.name) {
                *u = true;
                reach.push(d.text.join("\n"));
            }
        }
    }
    let dropped: Vec<&std::ops::RangeInclusive<usize>> =
        definitions.iter().zip(&used).filter(|(_, u)| !**u).map(|(d, _)| &d.lines).collect();
    let mut out = String::with_capacity(prelude.len() + body.len());
    for (n, line) in lines.iter().enumerate() {
        if !dropped.iter().any(|r| r.contains(&n)) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str(body);
    out
}

/// Whether `text` names `name` as a whole word (not inside a longer name).
fn refers_to(text: &str, name: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(name).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + name.len()..].chars().next();
        // `K.worker` is not `K.worker_instances`; a local named like a key entry is not it.
        !before.is_some_and(|c| word(c) || c == '.') && !after.is_some_and(word)
    })
}

pub(crate) struct Scripts {
    pub(crate) deployment_create: Script,
    pub(crate) deployment_update: Script,
    pub(crate) deployment_mark_deleting: Script,
    pub(crate) deployment_remove: Script,
    pub(crate) deployment_set_desired: Script,
    pub(crate) deployment_set_unplaceable: Script,
    pub(crate) worker_register: Script,
    pub(crate) lineage_ensure: Script,
    pub(crate) worker_ready: Script,
    pub(crate) worker_heartbeat: Script,
    pub(crate) worker_lost: Script,
    pub(crate) worker_inventory: Script,
    pub(crate) leases_expired: Script,
    pub(crate) workers_forget: Script,
    pub(crate) workers_lost_index: Script,
    pub(crate) instance_create: Script,
    pub(crate) instance_transition: Script,
    pub(crate) leader_batch: Script,
    pub(crate) leader_acquire: Script,
    pub(crate) leader_renew: Script,
    pub(crate) leader_release: Script,
    pub(crate) command_send: Script,
    pub(crate) command_ack: Script,
    pub(crate) demand_report: Script,
    pub(crate) demand_read: Script,
    pub(crate) demand_event: Script,
    pub(crate) dispatcher_register: Script,
    pub(crate) dispatchers_list: Script,
    pub(crate) rate_limit: Script,
    pub(crate) rate_share: Script,
    pub(crate) empty: Script,
}

impl Scripts {
    pub(crate) fn new() -> Scripts {
        Scripts {
            deployment_create: lua!("deployment_create"),
            deployment_update: lua!("deployment_update"),
            deployment_mark_deleting: lua!("deployment_mark_deleting"),
            deployment_remove: lua!("deployment_remove"),
            deployment_set_desired: lua!("deployment_set_desired"),
            deployment_set_unplaceable: lua!("deployment_set_unplaceable"),
            worker_register: lua!("worker_register"),
            lineage_ensure: lua!("lineage_ensure"),
            worker_ready: lua!("worker_ready"),
            worker_heartbeat: lua!("worker_heartbeat"),
            worker_lost: lua!("worker_lost"),
            worker_inventory: lua!("worker_inventory"),
            leases_expired: lua!("leases_expired"),
            workers_forget: lua!("workers_forget"),
            workers_lost_index: lua!("workers_lost_index"),
            instance_create: lua!("instance_create"),
            instance_transition: lua!("instance_transition"),
            leader_batch: lua!("leader_batch"),
            leader_acquire: lua!("leader_acquire"),
            leader_renew: lua!("leader_renew"),
            leader_release: lua!("leader_release"),
            command_send: lua!("command_send"),
            command_ack: lua!("command_ack"),
            demand_report: lua!("demand_report"),
            demand_read: lua!("demand_read"),
            demand_event: lua!("demand_event"),
            rate_limit: lua!("rate_limit"),
            rate_share: lua!("rate_share"),
            dispatcher_register: lua!("dispatcher_register"),
            dispatchers_list: lua!("dispatchers_list"),
            empty: lua!("empty"),
        }
    }
}

/// A script's reply: its code and the values after it, as text.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) script: &'static str,
    pub(crate) code: String,
    pub(crate) values: Vec<String>,
}

impl Reply {
    /// Reads a script's reply: an array of a code and scalar values.
    pub(crate) fn parse(script: &'static str, value: redis::Value) -> Result<Reply> {
        let items = match value {
            redis::Value::Array(items) => items,
            other => {
                return Err(Error::Protocol { script, detail: format!("not an array: {other:?}") });
            }
        };
        let mut texts = Vec::with_capacity(items.len());
        for item in &items {
            texts.push(value_text(item).ok_or_else(|| Error::Protocol {
                script,
                detail: format!("unexpected element {item:?}"),
            })?);
        }
        let mut it = texts.into_iter();
        let code =
            it.next().ok_or_else(|| Error::Protocol { script, detail: "empty reply".into() })?;
        Ok(Reply { script, code, values: it.collect() })
    }

    pub(crate) fn is_ok(&self) -> bool {
        self.code == "ok" || self.code == "noop"
    }

    /// The value at `i` (0 = first after the code).
    pub(crate) fn str(&self, i: usize) -> Result<&str> {
        self.values.get(i).map(String::as_str).ok_or_else(|| self.protocol(format!("no value {i}")))
    }

    pub(crate) fn u64(&self, i: usize) -> Result<u64> {
        let s = self.str(i)?;
        s.parse().map_err(|_| self.protocol(format!("value {i} {s:?} is not a number")))
    }

    pub(crate) fn protocol(&self, detail: String) -> Error {
        Error::Protocol {
            script: self.script,
            detail: format!("{} ({:?} {:?})", detail, self.code, self.values),
        }
    }

    /// Turns a refusal code into [`Error::Refused`]. Codes a script does not document are a
    /// protocol error.
    pub(crate) fn refused(self) -> Error {
        use crate::error::Refusal as R;
        let num = |i| self.u64(i);
        let refusal = match self.code.as_str() {
            "not_found" => Ok(R::NotFound),
            "already_exists" => Ok(R::AlreadyExists),
            "wrong_state" => self.str(0).map(|s| R::WrongState { current: s.to_string() }),
            "stale_version" => num(0).map(|current| R::StaleVersion { current }),
            "stale_epoch" => num(0).map(|current| R::StaleEpoch { current }),
            "not_leader" => Ok(R::NotLeader),
            "held" => {
                self.str(0).and_then(|h| Ok(R::Held { holder: h.to_string(), token: self.u64(1)? }))
            }
            "unauthenticated" => Ok(R::Unauthenticated),
            "address_in_use" => self.str(0).map(|h| R::AddressInUse { holder: h.to_string() }),
            "wrong_worker" => self.str(0).map(|o| R::WrongWorker { owner: o.to_string() }),
            "worker_not_found" => Ok(R::WorkerNotFound),
            "worker_not_ready" => self.str(0).map(|s| R::WorkerNotReady { state: s.to_string() }),
            "worker_lost" | "lost" => Ok(R::WorkerLost),
            "gpu_busy" => num(0).map(|gpu| R::GpuBusy { gpu: gpu as u32 }),
            "lease_alive" => num(0).map(|deadline_ms| R::LeaseAlive { deadline_ms }),
            "has_instances" => num(0).map(|count| R::HasInstances { count }),
            "not_allowed" | "bad_transition" => Ok(R::NotAllowed),
            other => Err(self.protocol(format!("unknown code {other:?}"))),
        };
        match refusal {
            Ok(refusal) => Error::Refused { transition: self.script, refusal },
            Err(e) => e,
        }
    }
}

fn value_text(v: &redis::Value) -> Option<String> {
    match v {
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        redis::Value::SimpleString(s) => Some(s.clone()),
        redis::Value::Int(i) => Some(i.to_string()),
        redis::Value::Okay => Some("OK".into()),
        redis::Value::Nil => Some(String::new()),
        _ => None,
    }
}

/// One argument for a script: text or bytes.
pub(crate) enum Arg<'a> {
    Str(&'a str),
    Owned(String),
    Bytes(&'a [u8]),
}

impl Arg<'_> {
    /// Its length in bytes.
    pub(crate) fn len(&self) -> usize {
        match self {
            Arg::Str(s) => s.len(),
            Arg::Owned(s) => s.len(),
            Arg::Bytes(b) => b.len(),
        }
    }

    /// The same argument, borrowed.
    pub(crate) fn borrow(&self) -> Arg<'_> {
        match self {
            Arg::Str(s) => Arg::Str(s),
            Arg::Owned(s) => Arg::Str(s),
            Arg::Bytes(b) => Arg::Bytes(b),
        }
    }
}

impl Store {
    /// Runs `script` with the common arguments (root, events maxlen, terminal TTL) followed by
    /// `args`, and parses its reply.
    pub(crate) async fn run(
        &self,
        name: &'static str,
        script: &Script,
        args: &[Arg<'_>],
    ) -> Result<Reply> {
        let value = self.run_value(name, script, args).await?;
        Reply::parse(name, value)
    }

    /// Like [`Store::run`], but the reply as Redis gave it.
    pub(crate) async fn run_value(
        &self,
        name: &'static str,
        script: &Script,
        args: &[Arg<'_>],
    ) -> Result<redis::Value> {
        let inner = &self.inner;
        let mut inv = script.prepare_invoke();
        inv.key(inner.keys.events())
            .arg(inner.keys.root())
            .arg(inner.config.events_maxlen)
            .arg(inner.config.terminal_ttl.as_millis() as u64);
        for a in args {
            match a {
                Arg::Str(s) => inv.arg(*s),
                Arg::Owned(s) => inv.arg(s.as_str()),
                Arg::Bytes(b) => inv.arg(*b),
            };
        }
        let mut conn = inner.conns.shared().await?;
        // A span only as part of a traced operation: heartbeats and other background calls
        // would otherwise each start a trace of their own.
        let span = if tracing::Span::current().is_none() {
            tracing::Span::none()
        } else {
            tracing::debug_span!(
                "redis",
                otel.name = %format_args!("EVALSHA {name}"),
                otel.kind = "client",
                db.system = "redis",
                db.operation.name = name,
            )
        };
        let start = std::time::Instant::now();
        let r: redis::RedisResult<redis::Value> =
            tracing::Instrument::instrument(inv.invoke_async(&mut conn.conn), span).await;
        let metrics = &*telemetry::metrics::REDIS;
        metrics.duration.with_label_values(&[name]).observe(start.elapsed().as_secs_f64());
        // Looked up on success too: an operation's error count shows, as 0, from its first call.
        let errors = metrics.errors.with_label_values(&[name]);
        if r.is_err() {
            errors.inc();
        }
        conn.check(r)
    }

    /// Like [`Store::run`], but a refusal becomes an error.
    pub(crate) async fn run_ok(
        &self,
        name: &'static str,
        script: &Script,
        args: &[Arg<'_>],
    ) -> Result<Reply> {
        let reply = self.run(name, script, args).await?;
        if reply.is_ok() { Ok(reply) } else { Err(reply.refused()) }
    }

    pub(crate) fn scripts(&self) -> &Scripts {
        &self.inner.scripts
    }
}

/// Checks that a GPU list is non-empty and returns it as the scripts' csv form.
pub(crate) fn gpu_csv(field: &'static str, gpus: &[u32]) -> Result<String> {
    if gpus.is_empty() {
        return Err(Error::invalid(field, "at least one GPU is needed"));
    }
    let mut seen = std::collections::HashSet::new();
    for g in gpus {
        if !seen.insert(g) {
            return Err(Error::invalid(field, format!("GPU {g} is listed twice")));
        }
    }
    Ok(gpus.iter().map(u32::to_string).collect::<Vec<_>>().join(","))
}

/// Validates a worker id and returns it (a small convenience for the many transitions that
/// take one).
pub(crate) fn worker_id<'a>(field: &'static str, id: &'a str) -> Result<&'a str> {
    names::validate_id(field, id)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every script in `lua/` but the prelude, as (file name, text).
    fn scripts() -> Vec<(String, String)> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../lua");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).expect("lua/ is readable") {
            let path = entry.expect("a directory entry").path();
            let name = path.file_name().unwrap_or_default().to_string_lossy().to_string();
            if name.ends_with(".lua") && name != "_prelude.lua" {
                out.push((name, std::fs::read_to_string(&path).expect("a readable script")));
            }
        }
        assert!(out.len() > 20, "found only {} scripts", out.len());
        out
    }

    /// The identifiers after `K.` in `text`.
    fn key_entries(text: &str) -> Vec<String> {
        text.match_indices("K.")
            .filter(|(at, _)| {
                !text[..*at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
            })
            .map(|(at, _)| {
                text[at + 2..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .filter(|e| !e.is_empty())
            .collect()
    }

    #[test]
    fn every_script_carries_each_prelude_definition_it_uses() {
        let functions: Vec<&str> = PRELUDE
            .lines()
            .filter_map(|l| l.strip_prefix("local function "))
            .filter_map(|r| r.split('(').next())
            .collect();
        let values: Vec<&str> = PRELUDE
            .lines()
            .filter(|l| !l.starts_with("local function ") && l.starts_with("local "))
            .filter_map(|l| l.strip_prefix("local ")?.split(' ').next())
            .collect();
        assert!(functions.contains(&"emit") && values.contains(&"ROOT"), "{functions:?}");
        for (file, body) in scripts() {
            assert!(!body.contains("K["), "{file} reaches a key entry other than as K.<entry>");
            let script = assemble(PRELUDE, &body);
            for entry in key_entries(&script) {
                assert!(
                    script.contains(&format!("\n  {entry} = ")),
                    "{file} uses K.{entry} but does not define it:\n{script}"
                );
            }
            for f in &functions {
                if refers_to(&script.replace(&format!("local function {f}("), ""), f) {
                    assert!(
                        script.contains(&format!("local function {f}(")),
                        "{file} uses {f} but does not define it"
                    );
                }
            }
            for v in &values {
                if refers_to(&script.replace(&format!("local {v} ="), ""), v) {
                    assert!(script.contains(&format!("local {v} =")), "{file} uses {v}");
                }
            }
            assert!(script.ends_with(&body), "{file}: the script itself comes last");
        }
    }

    #[test]
    fn a_script_carries_only_what_it_uses() {
        let heartbeat = assemble(PRELUDE, include_str!("../../lua/worker_heartbeat.lua"));
        for kept in
            ["local ROOT =", "  lease_deadlines = ", "  worker = ", "local function now_ms("]
        {
            assert!(heartbeat.contains(kept), "{kept:?} missing:\n{heartbeat}");
        }
        for dropped in ["  events_seq = ", "  worker_instances = ", "local function emit("] {
            assert!(!heartbeat.contains(dropped), "{dropped:?} kept:\n{heartbeat}");
        }
        // A transition that emits an event carries emit and the key it increments.
        let transition = assemble(PRELUDE, include_str!("../../lua/instance_transition.lua"));
        for kept in ["local function emit(", "  events_seq = ", "local LIVE =", "local TERMINAL ="]
        {
            assert!(transition.contains(kept), "{kept:?} missing");
        }
    }

    #[test]
    fn a_body_that_uses_everything_gets_the_whole_prelude() {
        let entries: Vec<String> = PRELUDE
            .lines()
            .skip_while(|l| *l != "local K = {")
            .skip(1)
            .take_while(|l| *l != "}")
            .filter_map(|l| Some(format!("K.{}", l.trim_start().split_once(" = ")?.0)))
            .collect();
        assert!(entries.len() > 20, "{entries:?}");
        let body = format!("{PRELUDE}return {{ {} }}\n", entries.join(", "));
        assert_eq!(assemble(PRELUDE, &body), format!("{PRELUDE}{body}"));
        let nothing = assemble(PRELUDE, "return { 'ok' }");
        assert!(!nothing.contains("local function"), "{nothing}");
        assert!(nothing.contains("local K = {\n}"), "{nothing}");
    }
}
