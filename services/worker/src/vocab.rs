//! The simulator's vocabulary, as an engine's tokenizer sees it: every byte is a token, each of
//! the simulator's words with its leading space is one, and — with merges, as `sllm sim-engine
//! --merges` runs — some pairs of words are one token too, as a BPE vocabulary merges frequent
//! pairs. Text round-trips through [`encode`] and [`decode`]; but with merges, re-tokenising
//! generated text does not give back the ids that were generated (a generation emits one word
//! at a time), as with a real BPE model. [`TokenModel`] is the simulator's language model over
//! token ids rather than text, so that a generation continued from re-tokenised text goes
//! another way than one continued from the ids, as on a real engine.

use crate::sim::{WORDS, pick};

/// Ids below this are single bytes.
const BYTES: u32 = 256;

fn words() -> u32 {
    WORDS.len() as u32
}

/// The id of the simulator's `k`-th word (with its leading space).
pub fn word_id(k: usize) -> u32 {
    BYTES + k as u32
}

/// Whether the words `a` and `b`, one after the other, are one token when merging: a third
/// of all pairs, so that any generated text of a few words holds some.
fn merged(a: usize, b: usize) -> bool {
    (a + b).is_multiple_of(3)
}

fn pair_id(a: usize, b: usize) -> u32 {
    BYTES + words() + (a as u32) * words() + b as u32
}

/// Ids the vocabulary has: bytes, words, pairs of words.
pub fn size() -> u32 {
    BYTES + words() + words() * words()
}

/// The longest word (with its leading space) at `p`: its index and length in bytes.
fn word_at(b: &[u8], p: usize) -> Option<(usize, usize)> {
    if b.get(p) != Some(&b' ') {
        return None;
    }
    let rest = &b[p + 1..];
    WORDS
        .iter()
        .enumerate()
        .filter(|(_, w)| rest.starts_with(w.as_bytes()))
        .max_by_key(|(_, w)| w.len())
        .map(|(k, w)| (k, w.len() + 1))
}

/// `text` as token ids: the longest word at each place (and, with `merges`, a word and the
/// next as one token where that pair is merged), else the byte.
pub fn encode(text: &str, merges: bool) -> Vec<u32> {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len() / 4 + 1);
    let mut p = 0;
    while p < b.len() {
        let Some((k, len)) = word_at(b, p) else {
            out.push(u32::from(b[p]));
            p += 1;
            continue;
        };
        match word_at(b, p + len) {
            Some((k2, len2)) if merges && merged(k, k2) => {
                out.push(pair_id(k, k2));
                p += len + len2;
            }
            _ => {
                out.push(word_id(k));
                p += len;
            }
        }
    }
    out
}

/// The text of `ids`; Err names the first id the vocabulary does not have.
pub fn decode(ids: &[u32]) -> Result<String, u32> {
    let mut bytes = Vec::with_capacity(ids.len() * 4);
    let n = words() as usize;
    for &id in ids {
        match id {
            i if i < BYTES => bytes.push(i as u8),
            i if i < BYTES + words() => {
                bytes.push(b' ');
                bytes.extend_from_slice(WORDS[(i - BYTES) as usize].as_bytes());
            }
            i if i < size() => {
                let pair = (i - BYTES - words()) as usize;
                for w in [WORDS[pair / n], WORDS[pair % n]] {
                    bytes.push(b' ');
                    bytes.extend_from_slice(w.as_bytes());
                }
            }
            unknown => return Err(unknown),
        }
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The simulator's language model over token ids: each token is a function of the seed and
/// every id before it (prompt and tokens so far), FNV-1a over them. A generation continued
/// from its prompt's ids and the ids it produced goes on exactly; one continued from those
/// ids' text tokenised again goes on differently wherever the text held a merged pair.
#[derive(Debug, Clone)]
pub struct TokenModel {
    h: u64,
}

impl TokenModel {
    /// A model about to continue `ids`.
    pub fn new(seed: u64, ids: &[u32]) -> TokenModel {
        let mut m = TokenModel { h: 0xcbf2_9ce4_8422_2325 };
        m.feed(&seed.to_le_bytes());
        for id in ids {
            m.feed(&id.to_le_bytes());
        }
        m
    }

    fn feed(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.h ^= u64::from(*b);
            self.h = self.h.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// The next token's id and text, which becomes part of the context.
    pub fn next_token(&mut self) -> (u32, String) {
        let k = pick(self.h);
        let id = word_id(k);
        self.feed(&id.to_le_bytes());
        (id, format!(" {}", WORDS[k]))
    }
}

/// The first `n` tokens' text the model over ids generates after `ids`.
pub fn ids_text(seed: u64, ids: &[u32], n: u32) -> String {
    let mut m = TokenModel::new(seed, ids);
    (0..n).map(|_| m.next_token().1).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn text_round_trips_through_the_vocabulary() {
        for text in ["hello engine", " the model serves tokens", "système: é\n", "", " to tokens"]
        {
            for merges in [false, true] {
                assert_eq!(decode(&encode(text, merges)).unwrap(), text, "{text:?} {merges}");
            }
        }
        assert_eq!(encode(" tokens to", false), vec![word_id(3), word_id(16)]);
        assert_eq!(decode(&[size()]), Err(size()));
    }

    #[test]
    fn generated_ids_tokenise_back_only_without_merges() {
        let prompt = encode("hello engine", true);
        let mut m = TokenModel::new(7, &prompt);
        let (ids, text): (Vec<u32>, String) = (0..40).map(|_| m.next_token()).unzip();
        assert_eq!(encode(&text, false), ids, "one word a token");
        assert_ne!(encode(&text, true), ids, "merged pairs are one token");
    }

    #[test]
    fn a_continuation_from_ids_is_exact_and_from_retokenised_text_is_not() {
        let prompt = encode("hello engine", true);
        let whole = ids_text(7, &prompt, 60);
        let mut differs = 0;
        for k in [3, 7, 12, 20, 31, 40] {
            let mut m = TokenModel::new(7, &prompt);
            let (ids, head): (Vec<u32>, String) = (0..k).map(|_| m.next_token()).unzip();
            let from_ids = ids_text(7, &[prompt.clone(), ids].concat(), 60 - k);
            assert_eq!(format!("{head}{from_ids}"), whole, "cut at {k}");
            let again = encode(&format!("{}{head}", decode(&prompt).unwrap()), true);
            differs += usize::from(format!("{head}{}", ids_text(7, &again, 60 - k)) != whole);
        }
        assert!(differs >= 5, "re-tokenised text goes another way: {differs} of 6");
    }
}
