//! `filter`: keeps the records that match a condition and drops the others (dropped records
//! are not rejects).
//!
//! Parameter `where` is one or more predicates joined by ` and `:
//!
//! - `FIELD == VALUE`, `!=`, `<`, `>`, `<=`, `>=`
//! - `FIELD in [V1, V2, ...]`
//! - `FIELD exists`, `FIELD !exists`
//!
//! FIELD is a field name or a dotted path into nested objects (`a.b`). VALUE is a JSON literal
//! (a number, a "string", `true`, `false`, `null`); a bare word such as `active` is the string
//! `"active"`. How values compare:
//!
//! - Numbers compare numerically (`1 == 1.0`). A string on one side and a number on the other
//!   compare numerically when the string holds a number (`"42" > 7`); otherwise the predicate
//!   is false.
//! - Strings compare byte-wise (`"10" < "9"`).
//! - Booleans and null only compare with `==`, `!=` and `in`; the order operators are false
//!   for them, for arrays and objects, and for missing fields.
//! - A missing field equals `null`: `x == null` holds when `x` is missing or null, and `!=`
//!   is always the negation of `==` (so `status != "deleted"` keeps records without a status).
//! - `exists` holds when the field is present and not null.

use std::cmp::Ordering;

use serde_json::Value;

use super::input::Record;
use super::value::{self, FieldPath};

/// A parsed `filter` stage: a conjunction of predicates.
#[derive(Debug)]
pub(crate) struct Filter {
    predicates: Vec<Predicate>,
}

#[derive(Debug)]
struct Predicate {
    path: FieldPath,
    test: Test,
}

#[derive(Debug, PartialEq)]
enum Test {
    Compare(Op, Value),
    In(Vec<Value>),
    Exists,
    Missing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

impl Filter {
    /// Parses the `where` parameter; the error quotes the text that does not parse.
    pub fn new(text: &str) -> Result<Self, String> {
        let mut parser = Parser { text, pos: 0 };
        let mut predicates = vec![parser.predicate()?];
        loop {
            parser.skip_ws();
            if parser.at_end() {
                break;
            }
            if !parser.keyword("and") {
                return Err(parser.error("expected \" and \" and another predicate, or the end"));
            }
            predicates.push(parser.predicate()?);
        }
        Ok(Self { predicates })
    }

    /// Keeps the records that match every predicate.
    pub fn run(&self, records: &mut Vec<Record>) {
        records.retain(|r| self.matches(&r.value));
    }

    fn matches(&self, record: &Value) -> bool {
        self.predicates.iter().all(|p| {
            let field = value::lookup(record, &p.path);
            match &p.test {
                Test::Compare(Op::Eq, v) => equals(field, v),
                Test::Compare(Op::Ne, v) => !equals(field, v),
                Test::Compare(op, v) => match order(field, v) {
                    Some(ord) => match op {
                        Op::Lt => ord == Ordering::Less,
                        Op::Gt => ord == Ordering::Greater,
                        Op::Le => ord != Ordering::Greater,
                        Op::Ge => ord != Ordering::Less,
                        Op::Eq | Op::Ne => false,
                    },
                    None => false,
                },
                Test::In(values) => values.iter().any(|v| equals(field, v)),
                Test::Exists => field.is_some_and(|v| !v.is_null()),
                Test::Missing => field.is_none_or(Value::is_null),
            }
        })
    }
}

/// `field == literal`, with a missing field as null and numbers compared numerically.
fn equals(field: Option<&Value>, literal: &Value) -> bool {
    match (field.unwrap_or(&Value::Null), literal) {
        (Value::Null, Value::Null) => true,
        (Value::Bool(a), Value::Bool(b)) => a == b,
        (Value::String(a), Value::String(b)) => a == b,
        // Numbers, and a numeric string against a number.
        (a, b) => order(Some(a), b) == Some(Ordering::Equal),
    }
}

/// The order of `field` against `literal`, where one is defined (numbers, numeric strings
/// against numbers, strings).
fn order(field: Option<&Value>, literal: &Value) -> Option<Ordering> {
    match (field?, literal) {
        (Value::String(a), Value::String(b)) => Some(a.as_bytes().cmp(b.as_bytes())),
        (a @ (Value::Number(_) | Value::String(_)), b @ (Value::Number(_) | Value::String(_))) => {
            Some(value::cmp_numbers(&value::numeric(a)?, &value::numeric(b)?))
        }
        _ => None,
    }
}

/// A cursor over the `where` text.
struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn rest(&self) -> &'a str {
        self.text.get(self.pos..).unwrap_or_default()
    }

    fn at_end(&self) -> bool {
        self.rest().is_empty()
    }

    fn skip_ws(&mut self) {
        let rest = self.rest();
        self.pos += rest.len() - rest.trim_start().len();
    }

    fn error(&self, what: &str) -> String {
        let rest = self.rest();
        if rest.is_empty() {
            format!("cannot parse {:?}: {what} at the end", self.text)
        } else {
            let shown: String = rest.chars().take(40).collect();
            format!("cannot parse {:?} at {shown:?}: {what}", self.text)
        }
    }

    /// Consumes `word` if it comes next followed by whitespace, the end or `[`.
    fn keyword(&mut self, word: &str) -> bool {
        let rest = self.rest();
        let Some(after) = rest.strip_prefix(word) else {
            return false;
        };
        if after.is_empty() || after.starts_with(char::is_whitespace) || after.starts_with('[') {
            self.pos += word.len();
            true
        } else {
            false
        }
    }

    /// Consumes `symbol` if it comes next.
    fn symbol(&mut self, symbol: &str) -> bool {
        if self.rest().starts_with(symbol) {
            self.pos += symbol.len();
            true
        } else {
            false
        }
    }

    fn predicate(&mut self) -> Result<Predicate, String> {
        self.skip_ws();
        let rest = self.rest();
        let len = rest
            .find(|c: char| c.is_whitespace() || "=!<>[".contains(c))
            .unwrap_or(rest.len());
        if len == 0 {
            return Err(self.error("expected a field name"));
        }
        let field = &rest[..len];
        let path = value::parse_path(field).map_err(|e| self.error(&e))?;
        self.pos += len;
        self.skip_ws();
        let op = [
            ("==", Op::Eq),
            ("!=", Op::Ne),
            ("<=", Op::Le),
            (">=", Op::Ge),
            ("<", Op::Lt),
            (">", Op::Gt),
        ]
        .into_iter()
        .find(|(symbol, _)| self.symbol(symbol));
        let test = if let Some((symbol, op)) = op {
            self.skip_ws();
            let Some(literal) = self.literal(false)? else {
                return Err(self.error(&format!("expected a value after {symbol}")));
            };
            Test::Compare(op, literal)
        } else if self.keyword("!exists") {
            Test::Missing
        } else if self.keyword("exists") {
            Test::Exists
        } else if self.keyword("in") {
            self.skip_ws();
            Test::In(self.list()?)
        } else {
            return Err(
                self.error("expected an operator: ==, !=, <, >, <=, >=, in, exists or !exists")
            );
        };
        Ok(Predicate { path, test })
    }

    /// `[V1, V2, ...]`
    fn list(&mut self) -> Result<Vec<Value>, String> {
        if !self.symbol("[") {
            return Err(self.error("expected [ and a list of values after in"));
        }
        let mut values = Vec::new();
        self.skip_ws();
        if self.symbol("]") {
            return Ok(values);
        }
        loop {
            self.skip_ws();
            match self.literal(true)? {
                Some(v) => values.push(v),
                None => return Err(self.error("expected a value in the list")),
            }
            self.skip_ws();
            if self.symbol("]") {
                return Ok(values);
            }
            if !self.symbol(",") {
                return Err(self.error("expected , or ] in the list"));
            }
        }
    }

    /// A JSON literal or a bare word; `None` at the end of the text. In a list a bare word
    /// also ends at `,` and `]`.
    fn literal(&mut self, in_list: bool) -> Result<Option<Value>, String> {
        let rest = self.rest();
        if rest.starts_with('"') {
            let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
            return match values.next() {
                Some(Ok(v)) => {
                    self.pos += values.byte_offset();
                    Ok(Some(v))
                }
                _ => Err(self.error("unterminated or invalid string")),
            };
        }
        if rest.starts_with(['[', '{']) {
            return Err(self.error("expected a number, a string, true, false or null"));
        }
        let len = rest
            .find(|c: char| c.is_whitespace() || (in_list && (c == ',' || c == ']')))
            .unwrap_or(rest.len());
        if len == 0 {
            return Ok(None);
        }
        let word = &rest[..len];
        self.pos += len;
        Ok(Some(match serde_json::from_str::<Value>(word) {
            Ok(v @ (Value::Number(_) | Value::Bool(_) | Value::Null)) => v,
            _ => Value::String(word.to_owned()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keeps(filter: &str, record: Value) -> bool {
        Filter::new(filter).unwrap().matches(&record)
    }

    #[test]
    fn comparisons() {
        let r = json!({"age": 30, "name": "bob", "score": "7.5", "ok": true, "n": null,
                       "addr": {"city": "Oslo", "zip": "0150"}});
        assert!(keeps("age == 30", r.clone()));
        assert!(keeps("age == 30.0", r.clone()));
        assert!(keeps("age==30", r.clone()));
        assert!(!keeps("age != 30", r.clone()));
        assert!(keeps("age > 29 and age < 31", r.clone()));
        assert!(keeps("age >= 30 and age <= 30", r.clone()));
        assert!(!keeps("age > 30", r.clone()));
        assert!(keeps("name == bob", r.clone()));
        assert!(keeps("name == \"bob\"", r.clone()));
        assert!(keeps("name < carl", r.clone()));
        assert!(keeps("score > 7", r.clone()), "numeric string vs number");
        assert!(keeps("score == 7.5", r.clone()));
        assert!(
            !keeps("name > 1", r.clone()),
            "non-numeric string vs number"
        );
        assert!(!keeps("name < 1", r.clone()));
        assert!(keeps("ok == true", r.clone()));
        assert!(!keeps("ok == \"true\"", r.clone()));
        assert!(!keeps("ok > false", r.clone()), "booleans have no order");
        assert!(keeps("addr.city == Oslo", r.clone()));
        assert!(keeps("addr.zip == \"0150\"", r.clone()));
        assert!(
            keeps("addr.zip == 150", r.clone()),
            "a numeric string equals its number"
        );
        assert!(
            !keeps("addr.zip == \"150\"", r.clone()),
            "strings compare as strings"
        );
    }

    #[test]
    fn strings_compare_bytewise() {
        assert!(keeps("v < \"9\"", json!({"v": "10"})));
        assert!(keeps("v > \"a b\"", json!({"v": "a c"})));
        assert!(keeps("v == \"x and y\"", json!({"v": "x and y"})));
        assert!(keeps("v == \"q\\\"uote\"", json!({"v": "q\"uote"})));
    }

    #[test]
    fn missing_fields_and_null() {
        let r = json!({"a": null, "b": 1});
        assert!(keeps("a == null", r.clone()));
        assert!(keeps("zz == null", r.clone()));
        assert!(keeps("zz != 5", r.clone()));
        assert!(!keeps("zz == 5", r.clone()));
        assert!(!keeps("zz < 5", r.clone()) && !keeps("zz > 5", r.clone()));
        assert!(keeps("b exists", r.clone()));
        assert!(!keeps("a exists", r.clone()), "null does not exist");
        assert!(keeps("a !exists and zz !exists", r.clone()));
        assert!(keeps("b.c !exists", r.clone()));
        assert!(!keeps("b !exists", r.clone()));
        assert!(keeps("b!exists", json!({})));
    }

    #[test]
    fn in_lists() {
        let r = json!({"s": "active", "n": 2});
        assert!(keeps("s in [active, pending]", r.clone()));
        assert!(keeps("s in [\"pending\", \"active\"]", r.clone()));
        assert!(keeps("s in[active]", r.clone()));
        assert!(!keeps("s in []", r.clone()));
        assert!(!keeps("s in [done]", r.clone()));
        assert!(keeps("n in [1, 2.0, 3]", r.clone()));
        assert!(keeps("n in [\"2\"]", r.clone()));
        assert!(keeps("missing in [null, 1]", r.clone()));
        assert!(keeps("s in [\"a, b\", active] and n == 2", r));
    }

    #[test]
    fn parse_errors_quote_the_text() {
        for (text, expect) in [
            ("", "expected a field name"),
            ("age", "expected an operator"),
            ("age >", "expected a value after >"),
            ("age ~ 3", "at \"~ 3\""),
            ("age > 3 or b == 1", "expected \" and \""),
            ("age > 3 and", "expected a field name"),
            ("s in active", "expected ["),
            ("s in [a, b", "expected , or ]"),
            ("s in [a,, b]", "expected a value in the list"),
            ("s == \"open", "unterminated"),
            ("s == [1]", "expected a number"),
            ("a..b == 1", "empty segment"),
        ] {
            let err = Filter::new(text).unwrap_err();
            assert!(err.contains(expect), "{text:?}: {err}");
            assert!(err.contains(&format!("{text:?}")), "{text:?}: {err}");
        }
    }
}
