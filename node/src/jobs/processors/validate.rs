//! `validate`: keeps records that a JSON Schema accepts and rejects the others.
//!
//! The schema (parameter `schema`) is compiled once, when the pipeline is parsed. Its draft is
//! the one its `$schema` names, else 2020-12. References resolve only inside the schema: the
//! node fetches no remote or file `$ref` (jsonschema is built without those resolvers), so
//! such a schema is a spec error.

use serde_json::Value;

use super::input::{Record, Rejects, Source};

/// A compiled schema.
pub(crate) struct Validate {
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for Validate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validate")
            .field("draft", &self.validator.draft())
            .finish_non_exhaustive()
    }
}

impl Validate {
    /// Compiles the schema text; the error says what is wrong with it.
    pub fn new(schema: &str) -> Result<Self, String> {
        let schema: Value =
            serde_json::from_str(schema).map_err(|e| format!("is not JSON: {e}"))?;
        let validator = jsonschema::validator_for(&schema).map_err(|e| {
            let at = e.schema_path().as_str();
            if at.is_empty() {
                format!("is not a valid JSON Schema: {e}")
            } else {
                format!("is not a valid JSON Schema: {e} (at {at})")
            }
        })?;
        Ok(Self { validator })
    }

    /// Keeps the valid records; each invalid one is rejected with its first error.
    pub fn run(&self, records: &mut Vec<Record>, source: &Source<'_>, rejects: &mut Rejects) {
        records.retain(|record| {
            // `is_valid` stops at the first failure without building errors.
            if self.validator.is_valid(&record.value) {
                return true;
            }
            let reason = match self.validator.iter_errors(&record.value).next() {
                Some(error) => {
                    let path = error.instance_path().as_str();
                    if path.is_empty() {
                        error.to_string()
                    } else {
                        format!("{path}: {error}")
                    }
                }
                None => "does not match the schema".to_owned(),
            };
            rejects.record(source, record, &reason);
            false
        });
    }
}
