//! What the processors share about JSON values: dotted field paths, number parsing and the
//! orders in which `filter` compares and `dedup` picks the latest record.

use std::cmp::Ordering;

use serde_json::{Number, Value};

/// A field path: `a.b` is field `b` of the object in field `a`.
pub(crate) type FieldPath = Vec<String>;

/// Parses a dotted path; every segment must be non-empty.
pub(crate) fn parse_path(text: &str) -> Result<FieldPath, String> {
    let path: FieldPath = text.split('.').map(str::to_owned).collect();
    if text.is_empty() {
        return Err("a field name is empty".into());
    }
    if path.iter().any(String::is_empty) {
        return Err(format!(
            "field path {text:?} has an empty segment (write a.b for field b inside object a)"
        ));
    }
    Ok(path)
}

/// The value at `path` inside `value`, if every step is an object holding the next field.
pub(crate) fn lookup<'v>(value: &'v Value, path: &[String]) -> Option<&'v Value> {
    path.iter()
        .try_fold(value, |v, segment| v.as_object()?.get(segment))
}

/// A number written in a string (`"42"`, `" -1.5 "`, `"1e3"`); `None` if it is not one, or is
/// not finite.
pub(crate) fn parse_number(text: &str) -> Option<Number> {
    let text = text.trim();
    if let Ok(i) = text.parse::<i64>() {
        return Some(Number::from(i));
    }
    if let Ok(u) = text.parse::<u64>() {
        return Some(Number::from(u));
    }
    // Rust's float parser also takes "inf" and "NaN"; JSON numbers are finite.
    text.parse::<f64>().ok().and_then(Number::from_f64)
}

/// Numeric order: exact between integers, by `f64` when a float is involved.
pub(crate) fn cmp_numbers(a: &Number, b: &Number) -> Ordering {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        return x.cmp(&y);
    }
    if let (Some(x), Some(y)) = (a.as_u64(), b.as_u64()) {
        return x.cmp(&y);
    }
    let x = a.as_f64().unwrap_or(0.0);
    let y = b.as_f64().unwrap_or(0.0);
    x.total_cmp(&y)
}

/// A number for comparisons: a JSON number, or a string that holds one.
pub(crate) fn numeric(value: &Value) -> Option<Number> {
    match value {
        Value::Number(n) => Some(n.clone()),
        Value::String(s) => parse_number(s),
        _ => None,
    }
}

/// The total order `dedup` uses for its timestamp field: missing or null, then `false`,
/// `true`, numbers (numerically), strings (byte-wise), and last arrays and objects (by their
/// compact JSON encoding).
pub(crate) fn cmp_ts(a: Option<&Value>, b: Option<&Value>) -> Ordering {
    fn rank(v: Option<&Value>) -> u8 {
        match v {
            None | Some(Value::Null) => 0,
            Some(Value::Bool(_)) => 1,
            Some(Value::Number(_)) => 2,
            Some(Value::String(_)) => 3,
            Some(Value::Array(_) | Value::Object(_)) => 4,
        }
    }
    match (a, b) {
        (Some(Value::Bool(x)), Some(Value::Bool(y))) => x.cmp(y),
        (Some(Value::Number(x)), Some(Value::Number(y))) => cmp_numbers(x, y),
        (Some(Value::String(x)), Some(Value::String(y))) => x.as_bytes().cmp(y.as_bytes()),
        (Some(x @ (Value::Array(_) | Value::Object(_))), Some(y)) if rank(Some(y)) == 4 => {
            encode(x).cmp(&encode(y))
        }
        _ => rank(a).cmp(&rank(b)),
    }
}

/// Compact JSON of a value.
pub(crate) fn encode(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_json(&mut out, value);
    out
}

/// Compact JSON of a value, as text.
pub(crate) fn json_text(value: &Value) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// Appends the compact JSON of `value` to `out`.
pub(crate) fn write_json(out: &mut Vec<u8>, value: &Value) {
    // Serialising a `Value` into a `Vec` cannot fail: its keys are strings and a Vec's writes
    // do not fail.
    if let Err(e) = serde_json::to_writer(&mut *out, value) {
        tracing::warn!(error = %e, "cannot encode a JSON value");
    }
}

/// A short description of a value's type for messages.
pub(crate) fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths() {
        assert_eq!(parse_path("a.b").unwrap(), vec!["a", "b"]);
        assert!(parse_path("").is_err());
        assert!(parse_path("a..b").unwrap_err().contains("a..b"));
        let v = json!({"a": {"b": 1}, "c": 2});
        assert_eq!(lookup(&v, &parse_path("a.b").unwrap()), Some(&json!(1)));
        assert_eq!(lookup(&v, &parse_path("c.d").unwrap()), None);
        assert_eq!(lookup(&v, &parse_path("x").unwrap()), None);
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_number(" 42 "), Some(Number::from(42)));
        assert_eq!(
            parse_number("18446744073709551615"),
            Some(Number::from(u64::MAX))
        );
        assert_eq!(parse_number("1e3").and_then(|n| n.as_f64()), Some(1000.0));
        assert_eq!(parse_number("abc"), None);
        assert_eq!(parse_number("NaN"), None);
        assert_eq!(parse_number("inf"), None);
        let n = |v: Value| v.as_number().cloned().unwrap();
        assert_eq!(cmp_numbers(&n(json!(1)), &n(json!(1.0))), Ordering::Equal);
        assert_eq!(
            cmp_numbers(&n(json!(-1)), &n(json!(u64::MAX))),
            Ordering::Less
        );
        assert_eq!(
            cmp_numbers(&n(json!(i64::MAX)), &n(json!(i64::MAX - 1))),
            Ordering::Greater
        );
        assert_eq!(cmp_numbers(&n(json!(2.5)), &n(json!(2))), Ordering::Greater);
    }

    #[test]
    fn timestamp_order() {
        let order = [
            None,
            Some(json!(false)),
            Some(json!(true)),
            Some(json!(-5)),
            Some(json!(3)),
            Some(json!(3.5)),
            Some(json!("")),
            Some(json!("2024-01-01")),
            Some(json!("2024-01-02")),
            Some(json!([1])),
            Some(json!({"a": 1})),
        ];
        for (i, a) in order.iter().enumerate() {
            for (j, b) in order.iter().enumerate() {
                assert_eq!(cmp_ts(a.as_ref(), b.as_ref()), i.cmp(&j), "{a:?} vs {b:?}");
            }
        }
        assert_eq!(cmp_ts(None, Some(&Value::Null)), Ordering::Equal);
    }
}
