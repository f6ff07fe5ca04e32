//! Reading records out of Redis hashes. Every field read names its key and field when it is
//! missing or unreadable, so a hand-edited or truncated record gives [`Error::Malformed`], never a
//! panic or a silent default.

use std::collections::HashMap;
use std::str::FromStr;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// The fields of one hash, with the key they came from.
pub struct Fields {
    key: String,
    map: HashMap<String, String>,
}

impl Fields {
    /// Wraps the result of `HGETALL key`.
    pub fn new(key: String, map: HashMap<String, String>) -> Fields {
        Fields { key, map }
    }

    /// Whether the hash was empty (Redis answers an absent key with an empty hash).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The key the fields came from.
    pub fn key(&self) -> &str {
        &self.key
    }

    fn malformed(&self, field: &str, reason: impl Into<String>) -> Error {
        Error::Malformed { key: self.key.clone(), field: field.to_string(), reason: reason.into() }
    }

    /// A field that must be present, as text.
    pub fn text(&self, field: &str) -> Result<String> {
        self.map.get(field).cloned().ok_or_else(|| self.malformed(field, "missing"))
    }

    /// A field that must be present and parse as `T`.
    pub fn parse<T: FromStr>(&self, field: &str) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        let raw = self.map.get(field).ok_or_else(|| self.malformed(field, "missing"))?;
        raw.parse::<T>().map_err(|e| self.malformed(field, format!("{raw:?}: {e}")))
    }

    /// A field that may be absent (then `default`), but must parse if present.
    pub fn parse_or<T: FromStr>(&self, field: &str, default: T) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        match self.map.get(field) {
            None => Ok(default),
            Some(raw) => {
                raw.parse::<T>().map_err(|e| self.malformed(field, format!("{raw:?}: {e}")))
            }
        }
    }

    /// A field holding JSON; absent or empty means `T::default()`.
    pub fn json<T: DeserializeOwned + Default>(&self, field: &str) -> Result<T> {
        match self.map.get(field) {
            None => Ok(T::default()),
            Some(raw) if raw.is_empty() => Ok(T::default()),
            Some(raw) => {
                serde_json::from_str(raw).map_err(|e| self.malformed(field, e.to_string()))
            }
        }
    }

    /// A comma-separated list of numbers; absent or empty means none.
    pub fn csv_u32(&self, field: &str) -> Result<Vec<u32>> {
        let Some(raw) = self.map.get(field) else {
            return Ok(Vec::new());
        };
        raw.split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<u32>().map_err(|e| self.malformed(field, format!("{raw:?}: {e}"))))
            .collect()
    }
}

/// Implements `as_str` / `FromStr` for a status enum over the lower-case words stored in Redis,
/// so a status is compared in one spelling everywhere.
macro_rules! status_words {
    ($ty:ident { $($variant:ident => $word:literal),+ $(,)? }) => {
        impl $ty {
            /// The word stored in Redis.
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $word),+ }
            }
            /// Every status, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];
        }
        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                match s {
                    $($word => Ok($ty::$variant),)+
                    other => Err(format!("unknown {} {other:?}", stringify!($ty))),
                }
            }
        }
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use status_words;
