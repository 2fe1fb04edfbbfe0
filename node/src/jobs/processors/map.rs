//! `map`: reshapes records field by field.
//!
//! Parameter `spec` is a JSON object with any of `rename` (`{"old": "new"}`), `cast`
//! (`{"field": "int" | "float" | "string" | "bool"}`), `default` (`{"field": value}`),
//! `drop` (`["field"]`) and `keep` (`["field"]`). They apply in that order: rename, cast,
//! default, drop, keep, so `cast`, `default`, `drop` and `keep` name fields by their new
//! names. Field names are top-level keys, taken literally (a dot is part of the name).
//!
//! - `rename` moves all its fields at once, so `{"a": "b", "b": "a"}` swaps them; a renamed
//!   field replaces a field already under the new name. A field that is missing is skipped.
//! - `cast` converts present, non-null values (null stays null for `default` to fill):
//!   `int` from integers, floats without a fraction, integer strings and booleans (1/0);
//!   `float` from numbers, numeric strings and booleans; `string` from anything (numbers,
//!   booleans and nested values as their JSON text); `bool` from booleans, the strings
//!   `true`/`false`/`1`/`0` (any case) and the numbers 1 and 0. Anything else rejects the
//!   record with a reason naming the field and the value.
//! - `default` sets fields that are missing or null.
//! - `drop` removes fields; `keep`, when given, removes every field it does not list.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::{Map, Number, Value};

use super::input::{Record, Rejects, Source};
use super::value;

/// A type `cast` converts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Cast {
    Int,
    Float,
    String,
    Bool,
}

/// The `spec` parameter as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    #[serde(default)]
    rename: BTreeMap<String, String>,
    #[serde(default)]
    cast: BTreeMap<String, Cast>,
    #[serde(default)]
    default: BTreeMap<String, Value>,
    #[serde(default)]
    drop: Vec<String>,
    keep: Option<Vec<String>>,
}

/// A parsed `map` stage.
#[derive(Debug)]
pub(crate) struct MapFields {
    rename: Vec<(String, String)>,
    cast: Vec<(String, Cast)>,
    default: Vec<(String, Value)>,
    drop: Vec<String>,
    keep: Option<BTreeSet<String>>,
}

impl MapFields {
    /// Parses the `spec` parameter; the error names the key or value at fault.
    pub fn new(spec: &str) -> Result<Self, String> {
        let spec: Spec = serde_json::from_str(spec).map_err(|e| {
            format!("{e} (expected a JSON object with keys rename, cast, default, drop and keep)")
        })?;
        let mut targets = BTreeMap::new();
        for (from, to) in &spec.rename {
            if from.is_empty() || to.is_empty() {
                return Err("rename: field names must not be empty".into());
            }
            if let Some(other) = targets.insert(to, from) {
                return Err(format!(
                    "rename: both {other:?} and {from:?} are renamed to {to:?}"
                ));
            }
        }
        Ok(Self {
            rename: spec.rename.into_iter().collect(),
            cast: spec.cast.into_iter().collect(),
            default: spec.default.into_iter().collect(),
            drop: spec.drop,
            keep: spec.keep.map(|k| k.into_iter().collect()),
        })
    }

    /// Applies the spec to every record; records with a value that cannot be cast are
    /// rejected.
    pub fn run(&self, records: &mut Vec<Record>, source: &Source<'_>, rejects: &mut Rejects) {
        records.retain_mut(|record| {
            let Value::Object(fields) = &mut record.value else {
                return true;
            };
            match self.apply(fields) {
                Ok(()) => true,
                Err(reason) => {
                    rejects.record(source, record, &reason);
                    false
                }
            }
        });
    }

    fn apply(&self, fields: &mut Map<String, Value>) -> Result<(), String> {
        if !self.rename.is_empty() {
            let moved: Vec<(&String, Value)> = self
                .rename
                .iter()
                .filter_map(|(from, to)| fields.remove(from).map(|v| (to, v)))
                .collect();
            for (to, v) in moved {
                fields.insert(to.clone(), v);
            }
        }
        for (field, cast) in &self.cast {
            if let Some(v) = fields.get_mut(field)
                && !v.is_null()
            {
                *v = convert(v, *cast).ok_or_else(|| {
                    format!(
                        "cannot cast field {field:?} value {} to {}",
                        value::json_text(v),
                        cast.name()
                    )
                })?;
            }
        }
        for (field, default) in &self.default {
            match fields.get_mut(field) {
                Some(v) if !v.is_null() => {}
                Some(v) => *v = default.clone(),
                None => {
                    fields.insert(field.clone(), default.clone());
                }
            }
        }
        for field in &self.drop {
            fields.remove(field);
        }
        if let Some(keep) = &self.keep {
            fields.retain(|k, _| keep.contains(k));
        }
        Ok(())
    }
}

impl Cast {
    fn name(self) -> &'static str {
        match self {
            Cast::Int => "int",
            Cast::Float => "float",
            Cast::String => "string",
            Cast::Bool => "bool",
        }
    }
}

/// The value converted to `cast`, if it can be.
fn convert(v: &Value, cast: Cast) -> Option<Value> {
    match (cast, v) {
        (Cast::Int, Value::Number(n)) if n.is_i64() || n.is_u64() => Some(v.clone()),
        (Cast::Int, Value::Number(n)) => n.as_f64().and_then(float_to_int),
        (Cast::Int, Value::String(s)) => {
            let s = s.trim();
            if let Ok(i) = s.parse::<i64>() {
                Some(Value::from(i))
            } else {
                s.parse::<u64>().ok().map(Value::from)
            }
        }
        (Cast::Int, Value::Bool(b)) => Some(Value::from(i64::from(*b))),
        (Cast::Float, Value::Number(n)) => n.as_f64().and_then(Number::from_f64).map(Value::Number),
        (Cast::Float, Value::String(s)) => value::parse_number(s)
            .and_then(|n| n.as_f64())
            .and_then(Number::from_f64)
            .map(Value::Number),
        (Cast::Float, Value::Bool(b)) => {
            Number::from_f64(f64::from(u8::from(*b))).map(Value::Number)
        }
        (Cast::String, Value::String(_)) => Some(v.clone()),
        (Cast::String, other) => Some(Value::String(value::json_text(other))),
        (Cast::Bool, Value::Bool(_)) => Some(v.clone()),
        (Cast::Bool, Value::String(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" => Some(Value::Bool(true)),
            "false" | "0" => Some(Value::Bool(false)),
            _ => None,
        },
        (Cast::Bool, Value::Number(n)) => match n.as_f64() {
            Some(1.0) => Some(Value::Bool(true)),
            Some(0.0) => Some(Value::Bool(false)),
            _ => None,
        },
        _ => None,
    }
}

/// A float with no fraction that fits an integer.
fn float_to_int(x: f64) -> Option<Value> {
    // 2^63 and 2^64 are exact in f64: the ranges are checked before converting.
    if x.fract() != 0.0 || !x.is_finite() {
        return None;
    }
    if (-9_223_372_036_854_775_808.0..9_223_372_036_854_775_808.0).contains(&x) {
        Some(Value::from(x as i64))
    } else if (0.0..18_446_744_073_709_551_616.0).contains(&x) {
        Some(Value::from(x as u64))
    } else {
        None
    }
}
