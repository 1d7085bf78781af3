//! Key layout of the one sled tree. Everything that must change together lives in one
//! tree so that a single `apply_batch` is atomic across records, events, queue,
//! indexes, idempotency keys, cursors and dead letters.
//!
//! | prefix | key                                  | value                    |
//! |--------|--------------------------------------|--------------------------|
//! | `e/`   | eval_id                              | evaluation JSON          |
//! | `l/`   | seq (u64 BE)                         | event JSON (the outbox)  |
//! | `x/`   | status byte, created_seq (u64 BE)    | eval_id (by status)      |
//! | `i/`   | idempotency key                      | eval_id fingerprint      |
//! | `k/`   | sink name                            | cursor (u64 BE)          |
//! | `d/`   | sink name, 0x00, seq (u64 BE)        | dead letter JSON         |
//! | `t/`   | terminal seq (u64 BE), eval_id       | empty (retention order)  |
//! | `j/`   | eval_id                              | its idempotency key      |
//! | `m/`   | name                                 | metadata                 |
//!
//! The queue is the `queued` part of the status index (`x/q...`): FIFO by `created_seq`.
//! Listing all evaluations newest-first merges the five status ranges.

pub const EVAL: &[u8] = b"e/";
pub const LOG: &[u8] = b"l/";
pub const STATUS: &[u8] = b"x/";
pub const IDEM: &[u8] = b"i/";
pub const CURSOR: &[u8] = b"k/";
pub const DEAD: &[u8] = b"d/";
pub const TERMINAL: &[u8] = b"t/";
pub const IDEM_OF: &[u8] = b"j/";

pub const META_NODE: &[u8] = b"m/node";
pub const META_HEAD: &[u8] = b"m/head";
pub const META_SCHEMA: &[u8] = b"m/schema";

/// The store layout version this build reads and writes (2: the `t/` and `j/` indexes
/// of retention; a layout-1 store is upgraded at open).
pub const SCHEMA_VERSION: u64 = 2;

fn cat(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + rest.len());
    k.extend_from_slice(prefix);
    k.extend_from_slice(rest);
    k
}

pub fn eval(id: &str) -> Vec<u8> {
    cat(EVAL, id.as_bytes())
}

pub fn log(seq: u64) -> Vec<u8> {
    cat(LOG, &seq.to_be_bytes())
}

pub fn status_prefix(status_code: u8) -> Vec<u8> {
    cat(STATUS, &[status_code])
}

pub fn status(status_code: u8, created_seq: u64) -> Vec<u8> {
    let mut k = status_prefix(status_code);
    k.extend_from_slice(&created_seq.to_be_bytes());
    k
}

pub fn idem(key: &str) -> Vec<u8> {
    cat(IDEM, key.as_bytes())
}

/// An idempotency key's value: `<eval_id> <fingerprint of the request>`.
pub fn idem_value(eval_id: &str, fingerprint: &str) -> String {
    format!("{eval_id} {fingerprint}")
}

/// The evaluation and request fingerprint of an idempotency key's value (keys written
/// before fingerprints were kept hold the eval_id alone, and match any request).
pub fn parse_idem_value(value: &[u8]) -> (String, Option<String>) {
    let text = String::from_utf8_lossy(value);
    match text.split_once(' ') {
        Some((id, fp)) => (id.to_string(), Some(fp.to_string())),
        None => (text.into_owned(), None),
    }
}

pub fn cursor(sink: &str) -> Vec<u8> {
    cat(CURSOR, sink.as_bytes())
}

pub fn dead_prefix(sink: &str) -> Vec<u8> {
    let mut k = cat(DEAD, sink.as_bytes());
    k.push(0);
    k
}

pub fn dead(sink: &str, seq: u64) -> Vec<u8> {
    let mut k = dead_prefix(sink);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// An evaluation in retention order: by the seq of its terminal event.
pub fn terminal(seq: u64, eval_id: &str) -> Vec<u8> {
    let mut k = cat(TERMINAL, &seq.to_be_bytes());
    k.extend_from_slice(eval_id.as_bytes());
    k
}

/// The idempotency key an evaluation was submitted with.
pub fn idem_of(eval_id: &str) -> Vec<u8> {
    cat(IDEM_OF, eval_id.as_bytes())
}

/// Read a big-endian u64 from the last 8 bytes of a key or from a value.
pub fn tail_u64(bytes: &[u8]) -> Option<u64> {
    if bytes.len() < 8 {
        return None;
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[bytes.len() - 8..]);
    Some(u64::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_keys_sort_numerically() {
        let mut keys: Vec<Vec<u8>> = [300u64, 2, 1 << 40, 17].iter().map(|s| log(*s)).collect();
        keys.sort();
        let seqs: Vec<u64> = keys.iter().filter_map(|k| tail_u64(k)).collect();
        assert_eq!(seqs, vec![2, 17, 300, 1 << 40]);
    }
}
