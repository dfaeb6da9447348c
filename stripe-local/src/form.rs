//! Stripe's request encoding: `application/x-www-form-urlencoded` with
//! bracketed nesting (`metadata[order]=x`, `line_items[0][price]=p`,
//! `enabled_events[]=*`), decoded to a JSON tree whose leaves are strings;
//! and [`Params`], which reads that tree the way Stripe validates it.

use serde_json::{Map, Value};

use crate::error::ApiError;

/// Decodes a form body or query string. Numeric brackets make arrays (in index
/// order, gaps closed), `[]` appends; a key used both as a value and as a
/// container is refused, naming the key.
pub fn decode(input: &str) -> Result<Value, ApiError> {
    let mut root = Map::new();
    for pair in input.split('&').filter(|p| !p.is_empty()) {
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(raw_key);
        let value = percent_decode(raw_value);
        let path = key_path(&key).ok_or_else(|| malformed(&key))?;
        insert(&mut root, &path, value).map_err(|()| malformed(&key))?;
    }
    let mut tree = Value::Object(root);
    arrays_from_indices(&mut tree);
    Ok(tree)
}

fn malformed(key: &str) -> ApiError {
    ApiError::invalid(key, format!("Invalid parameter encoding for {key}."))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push((hi * 16 + lo) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `a[b][]` → `["a", "b", ""]`; `None` when the brackets do not pair up.
fn key_path(key: &str) -> Option<Vec<&str>> {
    let (head, mut rest) = match key.find('[') {
        Some(i) => (&key[..i], &key[i..]),
        None => (key, ""),
    };
    if head.is_empty() {
        return None;
    }
    let mut path = vec![head];
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let close = inner.find(']')?;
        path.push(&inner[..close]);
        rest = &inner[close + 1..];
    }
    Some(path)
}

fn insert(map: &mut Map<String, Value>, path: &[&str], value: String) -> Result<(), ()> {
    let (first, rest) = path.split_first().ok_or(())?;
    if rest.is_empty() {
        if matches!(map.get(*first), Some(Value::Object(_) | Value::Array(_))) {
            return Err(());
        }
        map.insert(first.to_string(), Value::String(value));
        return Ok(());
    }
    if rest == [""] {
        let slot = map
            .entry(first.to_string())
            .or_insert_with(|| Value::Array(Vec::new()));
        return match slot {
            Value::Array(items) => {
                items.push(Value::String(value));
                Ok(())
            }
            _ => Err(()),
        };
    }
    if rest[0].is_empty() {
        return Err(());
    }
    let slot = map
        .entry(first.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    match slot {
        Value::Object(inner) => insert(inner, rest, value),
        _ => Err(()),
    }
}

/// Objects whose keys are all indices become arrays, sorted by index.
fn arrays_from_indices(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.values_mut().for_each(arrays_from_indices);
            let indexed: Option<Vec<usize>> = map.keys().map(|k| k.parse().ok()).collect();
            if let (Some(mut indices), false) = (indexed, map.is_empty()) {
                indices.sort_unstable();
                let mut taken = std::mem::take(map);
                let items = indices
                    .into_iter()
                    .filter_map(|i| taken.remove(&i.to_string()))
                    .collect();
                *value = Value::Array(items);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(arrays_from_indices),
        _ => {}
    }
}

/// The decoded parameters of one request, taken one by one; whatever is left
/// when a handler calls [`Params::finish`] is refused as unknown, as Stripe
/// refuses it. `expand` is always accepted (the answer is expanded later).
#[derive(Debug, Default)]
pub struct Params {
    map: Map<String, Value>,
    /// The name of the object being read, for error messages (`line_items[0]`).
    prefix: String,
}

impl Params {
    pub fn new(tree: Value) -> Params {
        match tree {
            Value::Object(map) => Params {
                map,
                prefix: String::new(),
            },
            _ => Params::default(),
        }
    }

    fn name(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}[{key}]", self.prefix)
        }
    }

    /// An optional string; an empty one reads as absent.
    pub fn string(&mut self, key: &str) -> Result<Option<String>, ApiError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::invalid(
                self.name(key),
                format!("Invalid string: {} must be a string.", self.name(key)),
            )),
        }
    }

    pub fn required(&mut self, key: &str) -> Result<String, ApiError> {
        self.string(key)?
            .ok_or_else(|| ApiError::Missing(self.name(key)))
    }

    pub fn integer(&mut self, key: &str) -> Result<Option<i64>, ApiError> {
        let name = self.name(key);
        self.string(key)?
            .map(|s| {
                s.parse().map_err(|_| ApiError::InvalidInteger {
                    param: name,
                    value: s,
                })
            })
            .transpose()
    }

    pub fn boolean(&mut self, key: &str) -> Result<Option<bool>, ApiError> {
        let name = self.name(key);
        match self.string(key)?.as_deref() {
            None => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(other) => Err(ApiError::invalid(
                &name,
                format!("Invalid boolean: {other}"),
            )),
        }
    }

    /// One of `allowed`, by name.
    pub fn choice(&mut self, key: &str, allowed: &[&str]) -> Result<Option<String>, ApiError> {
        let name = self.name(key);
        match self.string(key)? {
            Some(s) if !allowed.contains(&s.as_str()) => Err(ApiError::invalid(
                &name,
                format!("Invalid {name}: must be one of {}", allowed.join(", ")),
            )),
            other => Ok(other),
        }
    }

    /// A nested object (`recurring[...]`), read with the same rules.
    pub fn object(&mut self, key: &str) -> Result<Option<Params>, ApiError> {
        let prefix = self.name(key);
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Params { map, prefix })),
            Some(_) => Err(ApiError::invalid(
                &prefix,
                format!("Invalid object: {prefix} must be a hash."),
            )),
        }
    }

    /// An array of objects (`line_items[0][...]`).
    pub fn objects(&mut self, key: &str) -> Result<Vec<Params>, ApiError> {
        let prefix = self.name(key);
        match self.map.remove(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::Object(map) => Ok(Params {
                        map,
                        prefix: format!("{prefix}[{i}]"),
                    }),
                    _ => Err(ApiError::invalid(
                        format!("{prefix}[{i}]"),
                        format!("Invalid object: {prefix}[{i}] must be a hash."),
                    )),
                })
                .collect(),
            Some(_) => Err(ApiError::invalid(
                &prefix,
                format!("Invalid array: {prefix} must be an array."),
            )),
        }
    }

    /// An array of strings (`enabled_events[]`); a lone string counts as one.
    pub fn strings(&mut self, key: &str) -> Result<Vec<String>, ApiError> {
        let name = self.name(key);
        let bad = || ApiError::invalid(&name, format!("Invalid array: {name} must be an array."));
        match self.map.remove(key) {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s]),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(bad()),
                })
                .collect(),
            Some(_) => Err(bad()),
        }
    }

    /// `metadata[...]`: string values only. An empty value is kept, so that an
    /// update can remove that key.
    pub fn metadata(&mut self) -> Result<Option<Map<String, Value>>, ApiError> {
        match self.map.remove("metadata") {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(Some(Map::new())),
            Some(Value::Object(map)) if map.values().all(Value::is_string) => Ok(Some(map)),
            Some(_) => Err(ApiError::invalid(
                self.name("metadata"),
                "Invalid metadata: values must be strings.",
            )),
        }
    }

    /// The raw value of `key`, for parameters kept as given (`payload`).
    pub fn raw(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key)
    }

    /// Refuses any parameter no one read.
    pub fn finish(mut self) -> Result<(), ApiError> {
        self.map.remove("expand");
        match self.map.keys().next() {
            None => Ok(()),
            Some(key) => Err(ApiError::Unknown(self.name(key))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flat_pairs_decode_to_strings_with_percent_and_plus_decoded() {
        assert_eq!(
            decode("name=Ada+Lovelace&email=ada%40example.com&empty=").unwrap(),
            json!({"name": "Ada Lovelace", "email": "ada@example.com", "empty": ""})
        );
    }

    #[test]
    fn brackets_nest_objects() {
        assert_eq!(
            decode("metadata[order]=x&recurring[interval]=month&a[b][c]=d").unwrap(),
            json!({"metadata": {"order": "x"}, "recurring": {"interval": "month"}, "a": {"b": {"c": "d"}}})
        );
    }

    #[test]
    fn numeric_brackets_make_arrays_in_index_order() {
        assert_eq!(
            decode("line_items[1][price]=b&line_items[0][price]=a&line_items[0][quantity]=2")
                .unwrap(),
            json!({"line_items": [{"price": "a", "quantity": "2"}, {"price": "b"}]})
        );
    }

    #[test]
    fn empty_brackets_append() {
        assert_eq!(
            decode("enabled_events[]=*&expand[]=data.customer&expand[]=x").unwrap(),
            json!({"enabled_events": ["*"], "expand": ["data.customer", "x"]})
        );
    }

    #[test]
    fn encoded_brackets_in_keys_are_brackets() {
        assert_eq!(
            decode("metadata%5Bk%5D=v").unwrap(),
            json!({"metadata": {"k": "v"}})
        );
    }

    #[test]
    fn a_key_used_as_value_and_container_is_refused_naming_it() {
        let err = decode("a=1&a[b]=2").unwrap_err();
        assert_eq!(err.param(), Some("a[b]"));
        assert!(decode("a[b]=1&a=2").is_err());
        assert!(decode("a[b=1").is_err());
        assert!(decode("[x]=1").is_err());
    }

    #[test]
    fn a_stray_percent_is_kept() {
        assert_eq!(
            decode("q=100%&r=%zz").unwrap(),
            json!({"q": "100%", "r": "%zz"})
        );
    }

    #[test]
    fn params_left_unread_are_refused_as_unknown() {
        let mut p = Params::new(decode("name=x&nmae=y&expand[]=z").unwrap());
        assert_eq!(p.required("name").unwrap(), "x");
        let err = p.finish().unwrap_err();
        assert_eq!(err.param(), Some("nmae"));
    }

    #[test]
    fn nested_params_name_their_path_in_errors() {
        let mut p = Params::new(decode("line_items[0][quantity]=two").unwrap());
        let mut items = p.objects("line_items").unwrap();
        let err = items[0].integer("quantity").unwrap_err();
        assert_eq!(err.param(), Some("line_items[0][quantity]"));
        assert_eq!(err.code(), Some("parameter_invalid_integer"));
    }
}
