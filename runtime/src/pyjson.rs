//! JSON serialized the way Python's `json.dumps` does with its defaults:
//! `", "` between items, `": "` between key and value, and every character
//! outside printable ASCII escaped as `\uXXXX` (UTF-16, lowercase hex).
//! Langflow frames its stream events with exactly this encoding.

use std::io::{self, Write};

use serde::Serialize;
use serde_json::ser::{Formatter, Serializer};

/// Serializes `value` with Python's default `json.dumps` layout.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(512);
    let mut ser = Serializer::with_formatter(&mut out, PyFormatter);
    value.serialize(&mut ser)?;
    Ok(out)
}

struct PyFormatter;

impl Formatter for PyFormatter {
    fn begin_array_value<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut start = 0;
        for (i, ch) in fragment.char_indices() {
            if (' '..='~').contains(&ch) {
                continue;
            }
            writer.write_all(&fragment.as_bytes()[start..i])?;
            let mut units = [0u16; 2];
            for unit in ch.encode_utf16(&mut units) {
                write!(writer, "\\u{unit:04x}")?;
            }
            start = i + ch.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::to_vec;
    use serde_json::json;

    #[test]
    fn matches_python_defaults() {
        let v =
            json!({"event": "token", "data": {"chunk": " é😀\u{7f}\n\"", "list": [1, null, true]}});
        let s = String::from_utf8(to_vec(&v).unwrap()).unwrap();
        assert_eq!(
            s,
            r#"{"data": {"chunk": " \u00e9\ud83d\ude00\u007f\n\"", "list": [1, null, true]}, "event": "token"}"#
        );
    }

    #[test]
    fn empty_containers() {
        let s = String::from_utf8(to_vec(&json!({"a": [], "b": {}})).unwrap()).unwrap();
        assert_eq!(s, r#"{"a": [], "b": {}}"#);
    }
}
