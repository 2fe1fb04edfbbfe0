use std::collections::{BTreeMap, BTreeSet, HashMap};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use super::*;

/// A pipeline from `(processor, [(param, value)])` pairs.
fn pipeline(stages: &[(&str, &[(&str, &str)])]) -> Result<Pipeline, SpecError> {
    let params: Vec<BTreeMap<String, String>> = stages
        .iter()
        .map(|(_, ps)| {
            ps.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect();
    let specs: Vec<StageSpec<'_>> = stages
        .iter()
        .zip(&params)
        .map(|((processor, _), params)| StageSpec { processor, params })
        .collect();
    Pipeline::parse(&specs)
}

fn jsonl(data: &[u8]) -> ChunkInput<'_> {
    ChunkInput {
        data,
        format: Format::Jsonl,
        csv_header: None,
        first_chunk: true,
    }
}

fn csv<'a>(data: &'a [u8], header: Option<&'a [u8]>, first_chunk: bool) -> ChunkInput<'a> {
    ChunkInput {
        data,
        format: Format::Csv,
        csv_header: header,
        first_chunk,
    }
}

fn parse_lines(data: &[u8]) -> Vec<Value> {
    std::str::from_utf8(data)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The records of a shuffle buffer: each line is `KEY\tTS\tRECORD`.
fn shuffled(data: &[u8]) -> Vec<(Value, String, Value)> {
    text(data)
        .lines()
        .map(|l| {
            let mut fields = l.splitn(3, '\t');
            let key = serde_json::from_str(fields.next().unwrap()).unwrap();
            let ts = fields.next().unwrap().to_owned();
            let record = serde_json::from_str(fields.next().unwrap()).unwrap();
            (key, ts, record)
        })
        .collect()
}

fn text(data: &[u8]) -> &str {
    std::str::from_utf8(data).unwrap()
}

const SCHEMA: &str = r#"{
    "type": "object",
    "required": ["id", "age"],
    "properties": {"id": {"type": "string"}, "age": {"type": "integer", "minimum": 0}}
}"#;

#[test]
fn pipelines_are_shared_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Pipeline>();
}

#[test]
fn object_keys_come_out_sorted() {
    // Fails if some dependency turns on serde_json's `preserve_order`; then the documented
    // order (and every expected output here) changes.
    // A map stage that changes nothing still makes the record compact JSON.
    let p = pipeline(&[("map", &[("spec", r#"{"drop":["none"]}"#)])]).unwrap();
    let out = p
        .run_map(&jsonl(br#"{"b":1,"a":{"z":1,"y":2}}"#), 1)
        .unwrap();
    assert_eq!(text(&out.output), "{\"a\":{\"y\":2,\"z\":1},\"b\":1}\n");
}

#[test]
fn records_no_stage_changed_are_written_as_read() {
    // Key order, spacing inside the line, escapes and number texts all survive; serde_json
    // would round the 25-digit integer and the long decimal to f64s.
    let lines = [
        r#"{"z":1, "id":"a","age":3,"big":1234567890123456789012345}"#,
        r#"{"id":"\u0062","age":1.0e0,"n":0.1000000000000000055511151231257827}"#,
        "{\"id\":\"c\",\t\"age\":2}",
    ];
    let data = format!("  {}\r\n{}\n{}\n", lines[0], lines[1], lines[2]);
    let schema = r#"{"type":"object","required":["id"]}"#;
    let p = pipeline(&[
        ("validate", &[("schema", schema)]),
        ("filter", &[("where", "age > 0")]),
    ])
    .unwrap();
    let out = p.run_map(&jsonl(data.as_bytes()), 1).unwrap();
    assert_eq!(
        text(&out.output),
        format!("{}\n{}\n{}\n", lines[0], lines[1], lines[2])
    );

    // Shuffled, the same bytes travel to the reduce side, except a line with a tab between
    // its tokens, which would break the framing: it becomes compact JSON.
    let p = pipeline(&[
        ("validate", &[("schema", schema)]),
        ("dedup", &[("key", "id")]),
    ])
    .unwrap();
    let out = p.run_map(&jsonl(data.as_bytes()), 1).unwrap();
    let shuffle = text(&out.partitions[0]);
    let records: Vec<&str> = shuffle
        .lines()
        .map(|l| l.splitn(3, '\t').nth(2).unwrap())
        .collect();
    assert_eq!(records, [lines[0], lines[1], r#"{"age":2,"id":"c"}"#]);
    let reduced = p.run_reduce(&[&out.partitions[0]]).unwrap();
    assert_eq!(
        text(&reduced.output),
        format!("{}\n{}\n{}\n", lines[0], lines[1], r#"{"age":2,"id":"c"}"#)
    );

    // After a map stage the record is compact JSON with sorted keys.
    let p = pipeline(&[("map", &[("spec", r#"{"drop":["big","n"]}"#)])]).unwrap();
    let out = p.run_map(&jsonl(data.as_bytes()), 1).unwrap();
    assert_eq!(
        text(&out.output),
        "{\"age\":3,\"id\":\"a\",\"z\":1}\n{\"age\":1.0,\"id\":\"b\"}\n{\"age\":2,\"id\":\"c\"}\n"
    );
}

#[test]
fn jsonl_lines_blank_lines_crlf_and_rejects() {
    let p = pipeline(&[]).unwrap();
    let data = b"{\"a\": 1}\r\n\n   \n[1,2]\n{\"a\":\n{\"b\" : \"x\"}\r\n\"s\"\n{\"c\":3}";
    let out = p.run_map(&jsonl(data), 1).unwrap();
    // Written as read, without the whitespace around them.
    assert_eq!(
        text(&out.output),
        "{\"a\": 1}\n{\"b\" : \"x\"}\n{\"c\":3}\n"
    );
    let rejects = parse_lines(&out.rejects);
    assert_eq!(rejects.len(), 3, "{}", text(&out.rejects));
    assert_eq!(rejects[0]["line"], 4);
    assert_eq!(rejects[0]["raw"], "[1,2]");
    assert!(
        rejects[0]["reason"]
            .as_str()
            .unwrap()
            .contains("not a JSON object but an array")
    );
    assert_eq!(rejects[1]["line"], 5);
    assert!(
        rejects[1]["reason"]
            .as_str()
            .unwrap()
            .contains("invalid JSON")
    );
    assert_eq!(rejects[2]["line"], 7);
    assert!(rejects[2]["reason"].as_str().unwrap().contains("a string"));
    let parse = &out.stats[0];
    assert_eq!(parse.stage, "parse");
    assert_eq!((parse.records_in, parse.records_out), (6, 3));
    assert_eq!(parse.bytes_in, data.len() as u64);
    assert_eq!(out.stats[1].stage, "encode");
    assert!(out.partitions.is_empty());
}

#[test]
fn output_is_byte_identical_across_runs() {
    let p = pipeline(&[
        ("validate", &[("schema", SCHEMA)]),
        ("map", &[("spec", r#"{"cast":{"age":"string"}}"#)]),
    ])
    .unwrap();
    let data = b"{\"id\":\"a\",\"age\":3,\"z\":[1,{\"k\":2,\"j\":1}]}\n{\"id\":1,\"age\":2}\n";
    let a = p.run_map(&jsonl(data), 1).unwrap();
    let b = p.run_map(&jsonl(data), 1).unwrap();
    assert_eq!(a.output, b.output);
    assert_eq!(a.rejects, b.rejects);
    assert_eq!(
        text(&a.output),
        "{\"age\":\"3\",\"id\":\"a\",\"z\":[1,{\"j\":1,\"k\":2}]}\n"
    );
}

#[test]
fn csv_first_chunk_skips_its_header() {
    let p = pipeline(&[]).unwrap();
    let data = b"id,name,note\n1,ann,\n2,\"bob, jr\",\"two\nlines\"\n3,\"say \"\"hi\"\"\",x\r\n";
    let out = p
        .run_map(&csv(data, Some(b"id,name,note\n"), true), 1)
        .unwrap();
    assert_eq!(
        parse_lines(&out.output),
        vec![
            json!({"id": "1", "name": "ann", "note": ""}),
            json!({"id": "2", "name": "bob, jr", "note": "two\nlines"}),
            json!({"id": "3", "name": "say \"hi\"", "note": "x"}),
        ]
    );
    assert!(out.rejects.is_empty());
    assert_eq!(out.stats[0].records_in, 3);
    // Without a header given, the first chunk's first row is the header.
    let same = p.run_map(&csv(data, None, true), 1).unwrap();
    assert_eq!(same.output, out.output);
}

#[test]
fn a_byte_order_mark_opens_only_the_first_chunk() {
    let p = pipeline(&[]).unwrap();
    let out = p
        .run_map(&csv(b"\xEF\xBB\xBFid,v\n1,2\n", None, true), 1)
        .unwrap();
    assert_eq!(text(&out.output), "{\"id\":\"1\",\"v\":\"2\"}\n");
    let out = p
        .run_map(&csv(b"3,4\n", Some(b"\xEF\xBB\xBFid,v\n"), false), 1)
        .unwrap();
    assert_eq!(text(&out.output), "{\"id\":\"3\",\"v\":\"4\"}\n");
    let out = p.run_map(&jsonl(b"\xEF\xBB\xBF{\"a\":1}\n"), 1).unwrap();
    assert_eq!(text(&out.output), "{\"a\":1}\n");
    assert!(out.rejects.is_empty());
}

#[test]
fn csv_later_chunks_use_the_given_header() {
    let p = pipeline(&[]).unwrap();
    let data = b"4,dan,\"a\nb\"\n5,eve\n\n6,fay,f,extra\n7,gus,g";
    let out = p
        .run_map(&csv(data, Some(b"id,name,note"), false), 1)
        .unwrap();
    assert_eq!(
        parse_lines(&out.output),
        vec![
            json!({"id": "4", "name": "dan", "note": "a\nb"}),
            json!({"id": "7", "name": "gus", "note": "g"}),
        ]
    );
    let rejects = parse_lines(&out.rejects);
    assert_eq!(rejects.len(), 2, "{}", text(&out.rejects));
    // Line numbers count physical lines: row 4 spans lines 1-2.
    assert_eq!(rejects[0]["line"], 3);
    assert_eq!(rejects[0]["raw"], "5,eve");
    assert_eq!(
        rejects[0]["reason"],
        "expected 3 fields as in the header, found 2"
    );
    assert_eq!(rejects[1]["line"], 5);
    assert_eq!(rejects[1]["raw"], "6,fay,f,extra");
    assert!(rejects[1]["reason"].as_str().unwrap().contains("found 4"));

    let err = p.run_map(&csv(data, None, false), 1).unwrap_err();
    assert!(matches!(err, TaskError::CsvHeader(_)), "{err}");
    let err = p
        .run_map(&csv(data, Some(b"id,name,id\n"), false), 1)
        .unwrap_err();
    assert!(
        err.to_string().contains("\"id\" appears more than once"),
        "{err}"
    );
}

#[test]
fn csv_rejects_carry_the_row_as_an_object() {
    let p = pipeline(&[("validate", &[("schema", SCHEMA)])]).unwrap();
    let out = p
        .run_map(&csv(b"id,age\nx,1\ny,\"o\nld\"\n", None, true), 1)
        .unwrap();
    // Every CSV value is a string, so `age` fails "integer" on both rows.
    let rejects = parse_lines(&out.rejects);
    assert_eq!(rejects.len(), 2);
    assert_eq!(rejects[0]["line"], 2);
    assert_eq!(rejects[0]["record"], json!({"id": "x", "age": "1"}));
    assert_eq!(rejects[1]["line"], 3);
    assert_eq!(rejects[1]["record"], json!({"id": "y", "age": "o\nld"}));
    assert!(out.output.is_empty());
}

#[test]
fn validate_keeps_valid_and_rejects_invalid_with_the_first_error() {
    let p = pipeline(&[("validate", &[("schema", SCHEMA)])]).unwrap();
    let data = b"{\"id\":\"a\",\"age\":1}\n{\"id\":\"b\",\"age\":-1}\n{\"id\":\"c\"}\n{\"age\":  2, \"id\": 7}\n";
    let out = p.run_map(&jsonl(data), 1).unwrap();
    assert_eq!(text(&out.output), "{\"id\":\"a\",\"age\":1}\n");
    let rejects = parse_lines(&out.rejects);
    assert_eq!(rejects.len(), 3);
    assert_eq!(rejects[0]["line"], 2);
    let reason = rejects[0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("/age: ") && reason.contains("minimum"),
        "{reason}"
    );
    assert_eq!(rejects[0]["record"], json!({"id": "b", "age": -1}));
    let reason = rejects[1]["reason"].as_str().unwrap();
    assert!(
        reason.contains("\"age\" is a required property"),
        "{reason}"
    );
    assert!(rejects[2]["reason"].as_str().unwrap().starts_with("/id: "));
    assert_eq!(rejects[2]["record"], json!({"id": 7, "age": 2}));
    let stat = &out.stats[1];
    assert_eq!(stat.stage, "validate");
    assert_eq!((stat.records_in, stat.records_out), (4, 1));
    assert_eq!(stat.bytes_in, data.len() as u64);
}

#[test]
fn reject_lines_keep_their_field_order() {
    let p = pipeline(&[("validate", &[("schema", SCHEMA)])]).unwrap();
    let out = p
        .run_map(&jsonl(b"{\"id\":1,\"age\":1}\nnope\n"), 1)
        .unwrap();
    let lines: Vec<&str> = text(&out.rejects).lines().collect();
    assert!(
        lines[0].starts_with("{\"line\":1,\"reason\":\"/id: "),
        "{}",
        lines[0]
    );
    assert!(
        lines[0].ends_with(",\"record\":{\"age\":1,\"id\":1}}"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with("{\"line\":2,\"reason\":\"invalid JSON"),
        "{}",
        lines[1]
    );
    assert!(lines[1].ends_with(",\"raw\":\"nope\"}"), "{}", lines[1]);
}

#[test]
fn schema_errors_are_spec_errors() {
    let err = pipeline(&[
        ("filter", &[("where", "a == 1")]),
        ("validate", &[("schema", "{")]),
    ])
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("stage 2 (validate): parameter \"schema\" is not JSON"),
        "{msg}"
    );
    let err = pipeline(&[("validate", &[("schema", r#"{"type": "strin"}"#)])]).unwrap_err();
    assert!(
        err.to_string().contains("is not a valid JSON Schema"),
        "{err}"
    );
    // Remote and file references are never fetched.
    for r in ["http://127.0.0.1:1/s.json", "file:///etc/passwd"] {
        let schema = format!(r#"{{"$ref": "{r}"}}"#);
        let err = pipeline(&[("validate", &[("schema", &schema)])]).unwrap_err();
        assert!(
            matches!(
                err,
                SpecError::InvalidParam {
                    param: "schema",
                    ..
                }
            ),
            "{err}"
        );
    }
    let err = pipeline(&[("validate", &[])]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "stage 1 (validate): missing parameter \"schema\""
    );
    // Internal references and other drafts work.
    let schema = r##"{"$schema": "http://json-schema.org/draft-07/schema#",
        "definitions": {"pos": {"type": "integer", "minimum": 1}},
        "properties": {"n": {"$ref": "#/definitions/pos"}}}"##;
    let p = pipeline(&[("validate", &[("schema", schema)])]).unwrap();
    let out = p.run_map(&jsonl(b"{\"n\":1}\n{\"n\":0}\n"), 1).unwrap();
    assert_eq!(text(&out.output), "{\"n\":1}\n");
}

#[test]
fn map_renames_casts_defaults_drops_and_keeps_in_order() {
    let spec = r#"{
        "rename": {"a": "b", "b": "a", "old": "age"},
        "cast": {"age": "int", "f": "float", "s": "string", "ok": "bool", "n": "int"},
        "default": {"n": 0, "missing": "x", "age": 99},
        "drop": ["gone"],
        "keep": ["a", "b", "age", "f", "s", "ok", "n", "missing"]
    }"#;
    let p = pipeline(&[("map", &[("spec", spec)])]).unwrap();
    let data = br#"{"a":1,"b":2,"old":" 42 ","f":"2.5","s":{"x":[1]},"ok":"TRUE","n":null,"gone":1,"other":5}"#;
    let out = p.run_map(&jsonl(data), 1).unwrap();
    assert_eq!(
        parse_lines(&out.output),
        vec![
            json!({"a": 2, "b": 1, "age": 42, "f": 2.5, "s": "{\"x\":[1]}", "ok": true,
                    "n": 0, "missing": "x"})
        ]
    );
}

#[test]
fn map_casts() {
    let cast = |to: &str, v: Value| -> Result<Value, String> {
        let spec = format!(r#"{{"cast": {{"v": "{to}"}}}}"#);
        let p = pipeline(&[("map", &[("spec", &spec)])]).unwrap();
        let line = serde_json::to_vec(&json!({ "v": v })).unwrap();
        let out = p.run_map(&jsonl(&line), 1).unwrap();
        match parse_lines(&out.output).pop() {
            Some(r) => Ok(r["v"].clone()),
            None => Err(parse_lines(&out.rejects)[0]["reason"]
                .as_str()
                .unwrap()
                .to_owned()),
        }
    };
    assert_eq!(cast("int", json!(3.0)), Ok(json!(3)));
    assert_eq!(cast("int", json!("-7")), Ok(json!(-7)));
    assert_eq!(cast("int", json!(true)), Ok(json!(1)));
    assert_eq!(cast("int", json!(null)), Ok(json!(null)));
    assert_eq!(
        cast("int", json!("abc")),
        Err("cannot cast field \"v\" value \"abc\" to int".into())
    );
    assert!(cast("int", json!(2.5)).unwrap_err().contains("2.5"));
    assert!(cast("int", json!(1e30)).is_err());
    assert!(cast("int", json!([1])).is_err());
    assert_eq!(cast("float", json!(2)), Ok(json!(2.0)));
    assert_eq!(cast("float", json!("1e3")), Ok(json!(1000.0)));
    assert!(cast("float", json!("NaN")).is_err());
    assert_eq!(cast("string", json!(12)), Ok(json!("12")));
    assert_eq!(cast("string", json!(false)), Ok(json!("false")));
    assert_eq!(cast("bool", json!("0")), Ok(json!(false)));
    assert_eq!(cast("bool", json!(1)), Ok(json!(true)));
    assert!(cast("bool", json!("yes")).is_err());
    assert!(cast("bool", json!(2)).is_err());
}

#[test]
fn map_cast_failures_are_rejects_with_the_original_record() {
    let p = pipeline(&[(
        "map",
        &[(
            "spec",
            r#"{"rename": {"n": "count"}, "cast": {"count": "int"}}"#,
        )],
    )])
    .unwrap();
    let out = p
        .run_map(&jsonl(b"{\"n\":\"5\"}\n{\"n\":\"five\"}\n"), 1)
        .unwrap();
    assert_eq!(text(&out.output), "{\"count\":5}\n");
    let rejects = parse_lines(&out.rejects);
    assert_eq!(
        rejects,
        vec![
            json!({"line": 2, "reason": "cannot cast field \"count\" value \"five\" to int",
                    "record": {"n": "five"}})
        ]
    );
}

#[test]
fn map_spec_errors() {
    for (spec, expect) in [
        (r#"{"renam": {}}"#, "unknown field `renam`"),
        (r#"{"cast": {"a": "integer"}}"#, "unknown variant `integer`"),
        (r#"{"drop": "a"}"#, "invalid type"),
        (
            r#"{"rename": {"a": "c", "b": "c"}}"#,
            "are renamed to \"c\"",
        ),
        ("[1]", "expected a JSON object"),
    ] {
        let err = pipeline(&[("map", &[("spec", spec)])])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("stage 1 (map): parameter \"spec\" "),
            "{err}"
        );
        assert!(err.contains(expect), "{spec}: {err}");
    }
}

#[test]
fn filter_drops_without_rejecting() {
    let p = pipeline(&[("filter", &[("where", "age >= 18 and country in [NO, SE]")])]).unwrap();
    let data = b"{\"age\":20,\"country\":\"NO\"}\n{\"age\":\"17\",\"country\":\"SE\"}\n{\"age\":30}\n{\"age\":\"40\",\"country\":\"SE\"}\n";
    let out = p.run_map(&jsonl(data), 1).unwrap();
    assert_eq!(
        parse_lines(&out.output),
        vec![
            json!({"age": 20, "country": "NO"}),
            json!({"age": "40", "country": "SE"}),
        ]
    );
    assert!(out.rejects.is_empty());
    assert_eq!(out.stats[1].records_out, 2);
    let err = pipeline(&[("filter", &[("where", "age >")])]).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("stage 1 (filter): parameter \"where\" cannot parse \"age >\""),
        "{msg}"
    );
}

#[test]
fn spec_errors_name_stage_processor_and_parameter() {
    type Stages<'a> = Vec<(&'a str, &'a [(&'a str, &'a str)])>;
    let cases: Vec<(Stages<'_>, &str)> = vec![
        (
            vec![("sort", &[])],
            "stage 1: unknown processor \"sort\"; expected validate, map, filter, dedup or exec:NAME",
        ),
        (
            vec![("filter", &[("where", "a exists"), ("limit", "3")])],
            "stage 1 (filter): unknown parameter \"limit\"; expected where",
        ),
        (
            vec![("map", &[("spec", "{}")]), ("dedup", &[])],
            "stage 2 (dedup): missing parameter \"key\"",
        ),
        (
            vec![
                ("dedup", &[("key", "id")]),
                ("filter", &[("where", "a exists")]),
            ],
            "stage 1 (dedup): dedup must be the last stage",
        ),
        (
            vec![("dedup", &[("key", "id,")])],
            "stage 1 (dedup): parameter \"key\" ",
        ),
        (
            vec![("dedup", &[("key", "id"), ("ts", "a..b")])],
            "stage 1 (dedup): parameter \"ts\" ",
        ),
        (
            vec![("filter", &[("where", "a exists")]), ("exec:wc", &[])],
            "stage 2 (exec:wc): an exec stage runs alone",
        ),
        (
            vec![("exec:w c", &[])],
            "stage 1 (exec:w c): \"w c\" is not a processor name",
        ),
        (
            vec![("exec:", &[])],
            "stage 1 (exec:): \"\" is not a processor name",
        ),
        (
            vec![("exec:wc", &[("x", "1")])],
            "stage 1 (exec:wc): unknown parameter \"x\"; it takes none",
        ),
    ];
    for (stages, expect) in cases {
        let err = pipeline(&stages).unwrap_err().to_string();
        assert!(err.starts_with(expect), "{err}\nexpected: {expect}");
    }
}

#[test]
fn names_shuffling_and_exec() {
    let p = pipeline(&[
        ("filter", &[("where", "a exists")]),
        ("map", &[("spec", "{}")]),
        ("filter", &[("where", "b exists")]),
        ("dedup", &[("key", "a")]),
    ])
    .unwrap();
    assert_eq!(p.stage_names(), ["filter", "map", "filter#2", "dedup"]);
    assert!(p.shuffles());
    assert_eq!(p.exec_name(), None);
    let out = p.run_map(&jsonl(b"{\"a\":1,\"b\":2}\n"), 2).unwrap();
    let stages: Vec<&str> = out.stats.iter().map(|s| s.stage.as_str()).collect();
    assert_eq!(
        stages,
        ["parse", "filter", "map", "filter#2", "dedup", "encode"]
    );
    assert!(matches!(
        p.run_map(&jsonl(b""), 0),
        Err(TaskError::NoPartitions)
    ));

    let p = pipeline(&[("exec:wordcount", &[])]).unwrap();
    assert_eq!(p.exec_name(), Some("wordcount"));
    assert_eq!(p.stage_names(), ["exec:wordcount"]);
    assert!(!p.shuffles());
    assert!(matches!(p.run_map(&jsonl(b""), 1), Err(TaskError::Exec(_))));
    assert!(matches!(p.run_reduce(&[]), Err(TaskError::Exec(_))));

    let p = pipeline(&[("validate", &[("schema", "{}")])]).unwrap();
    assert!(!p.shuffles());
    assert!(matches!(p.run_reduce(&[]), Err(TaskError::NoReduce)));
    // Without dedup, partitions are not used.
    let out = p.run_map(&jsonl(b"{}\n"), 0).unwrap();
    assert_eq!(out.output, b"{}\n");
}

#[test]
fn reduce_rejects_corrupt_input_as_a_task_error() {
    let p = pipeline(&[("dedup", &[("key", "id"), ("ts", "ts")])]).unwrap();
    let err = p
        .run_reduce(&[
            b"[1]\t\t{\"id\":1}\n",
            b"[2]\t3\t{\"id\":2,\"ts\":3}\n\n{\"id\":3}\n",
        ])
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("reduce input 1, line 3: not a shuffle line"),
        "{msg}"
    );
    // A timestamp is only parsed when two records share a key; a broken one is an error then.
    let err = p
        .run_reduce(&[b"[1]\t5\t{\"id\":1}\n[1]\t{x\t{\"id\":1}\n"])
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("reduce input 0, line 2: a shuffle line's timestamp is not JSON"),
        "{msg}"
    );
    let out = p.run_reduce(&[]).unwrap();
    assert!(out.output.is_empty());
}

#[test]
fn shuffle_lines_survive_tabs_and_newlines_in_keys_and_values() {
    let p = pipeline(&[("dedup", &[("key", "k\tey"), ("ts", "t")])]).unwrap();
    let records = [
        json!({"k\tey": "a\tb\nc", "t": "x\ty", "v": 1}),
        json!({"k\tey": "a\tb\nc", "t": "x\tz", "v": 2}),
        json!({"k\tey": "a\tb", "t": 1, "v": "\t"}),
    ];
    let out = p.run_map(&jsonl(&to_jsonl(&records)), 1).unwrap();
    assert_eq!(shuffled(&out.partitions[0]).len(), 3);
    let reduced = p.run_reduce(&[&out.partitions[0]]).unwrap();
    assert_eq!(
        parse_lines(&reduced.output),
        [records[2].clone(), records[1].clone()]
    );
}

/// Generated records: `count` records over `keys` distinct ids, with timestamps that tie
/// often, in JSONL.
fn generate(count: usize, keys: u64, seed: u64) -> Vec<Value> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..count)
        .map(|i| {
            let id = rng.random_range(0..keys);
            let region = ["eu", "us", "ap"][(id % 3) as usize];
            let mut r = json!({
                "id": format!("u{id:05}"),
                "region": region,
                "ts": rng.random_range(0..20u32),
                "seq": i,
                "payload": "x".repeat(rng.random_range(0..40)),
            });
            if id % 97 == 0 {
                // Some records without a timestamp: they are the oldest.
                r.as_object_mut().unwrap().remove("ts");
            }
            r
        })
        .collect()
}

fn to_jsonl(records: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        out.extend(serde_json::to_vec(r).unwrap());
        out.push(b'\n');
    }
    out
}

/// Map over `chunks` chunks and reduce each of `partitions` partitions; returns the reduce
/// outputs.
fn map_reduce(p: &Pipeline, records: &[Value], chunks: usize, partitions: u32) -> Vec<Vec<u8>> {
    let per_chunk = records.len().div_ceil(chunks);
    let maps: Vec<MapOutput> = records
        .chunks(per_chunk)
        .map(|chunk| p.run_map(&jsonl(&to_jsonl(chunk)), partitions).unwrap())
        .collect();
    (0..partitions as usize)
        .map(|part| {
            let inputs: Vec<&[u8]> = maps.iter().map(|m| m.partitions[part].as_slice()).collect();
            p.run_reduce(&inputs).unwrap().output
        })
        .collect()
}

#[test]
fn dedup_matches_a_straightforward_computation() {
    let records = generate(10_000, 2_500, 7);
    let p = pipeline(&[("dedup", &[("key", "id,region"), ("ts", "ts")])]).unwrap();
    let outputs = map_reduce(&p, &records, 4, 3);

    // The reference: a HashMap from key to the greatest (ts, encoding).
    let mut best: HashMap<(String, String), (i64, Vec<u8>)> = HashMap::new();
    for r in &records {
        let key = (
            r["id"].as_str().unwrap().to_owned(),
            r["region"].as_str().unwrap().to_owned(),
        );
        let ts = r.get("ts").map_or(-1, |t| t.as_i64().unwrap());
        let candidate = (ts, serde_json::to_vec(r).unwrap());
        match best.get(&key) {
            Some(current) if *current >= candidate => {}
            _ => {
                best.insert(key, candidate);
            }
        }
    }
    let expected: BTreeSet<Vec<u8>> = best.into_values().map(|(_, line)| line).collect();
    let got: Vec<Vec<u8>> = outputs
        .iter()
        .flat_map(|o| o.split(|&b| b == b'\n').filter(|l| !l.is_empty()))
        .map(<[u8]>::to_vec)
        .collect();
    assert_eq!(got.len(), expected.len(), "one record per key");
    assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), expected);
    assert!(expected.len() > 2_000 && expected.len() < 10_000);

    // Each partition's output is sorted by key.
    for output in &outputs {
        let keys: Vec<String> = parse_lines(output)
            .iter()
            .map(|r| serde_json::to_string(&json!([r["id"], r["region"]])).unwrap())
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }
}

#[test]
fn dedup_does_not_depend_on_input_order_or_partitioning() {
    let mut records = generate(3_000, 500, 11);
    let p = pipeline(&[("dedup", &[("key", "id"), ("ts", "ts")])]).unwrap();
    let reference = map_reduce(&p, &records, 1, 1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for (chunks, partitions) in [(1, 1), (3, 2), (7, 5), (2, 16)] {
        records.shuffle(&mut rng);
        let outputs = map_reduce(&p, &records, chunks, partitions);
        // With one partition, byte-identical output; with several, the same set of lines.
        if partitions == 1 {
            assert_eq!(outputs, reference);
        }
        let lines = |outs: &[Vec<u8>]| -> BTreeSet<Vec<u8>> {
            outs.iter()
                .flat_map(|o| o.split(|&b| b == b'\n').filter(|l| !l.is_empty()))
                .map(<[u8]>::to_vec)
                .collect()
        };
        assert_eq!(
            lines(&outputs),
            lines(&reference),
            "{chunks} chunks, {partitions} partitions"
        );
    }
    // Reversing the reduce inputs changes nothing either.
    let maps: Vec<MapOutput> = records
        .chunks(1_000)
        .map(|c| p.run_map(&jsonl(&to_jsonl(c)), 1).unwrap())
        .collect();
    let mut inputs: Vec<&[u8]> = maps.iter().map(|m| m.partitions[0].as_slice()).collect();
    let forward = p.run_reduce(&inputs).unwrap().output;
    inputs.reverse();
    assert_eq!(p.run_reduce(&inputs).unwrap().output, forward);
    assert_eq!(vec![forward], reference);
}

#[test]
fn dedup_partitions_by_key_and_reports_stats() {
    let p = pipeline(&[
        ("validate", &[("schema", SCHEMA)]),
        ("dedup", &[("key", "id"), ("ts", "age")]),
    ])
    .unwrap();
    let data = b"{\"id\":\"a\",\"age\":1}\n{\"id\":\"b\",\"age\":2}\n{\"id\":\"a\",\"age\":3}\n{\"id\":5,\"age\":3}\n";
    let out = p.run_map(&jsonl(data), 4).unwrap();
    assert_eq!(out.partitions.len(), 4);
    assert!(out.output.is_empty());
    assert_eq!(parse_lines(&out.rejects).len(), 1);
    // Both "a" records land in one partition.
    let with_a: Vec<usize> = out
        .partitions
        .iter()
        .enumerate()
        .filter(|(_, p)| text(p).contains("\"id\":\"a\""))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(with_a.len(), 1);
    assert_eq!(
        text(&out.partitions[with_a[0]])
            .matches("\"id\":\"a\"")
            .count(),
        2
    );
    let total: usize = out.partitions.iter().map(|p| shuffled(p).len()).sum();
    assert_eq!(total, 3);
    // Each shuffle line carries the key and the timestamp beside the record.
    let mut lines: Vec<(Value, String, Value)> =
        out.partitions.iter().flat_map(|p| shuffled(p)).collect();
    lines.sort_by_key(|(_, ts, _)| ts.clone());
    assert_eq!(
        lines[1],
        (json!(["b"]), "2".to_owned(), json!({"id": "b", "age": 2}))
    );

    let inputs: Vec<&[u8]> = out.partitions.iter().map(Vec::as_slice).collect();
    let reduced = p.run_reduce(&inputs).unwrap();
    assert_eq!(
        text(&reduced.output),
        "{\"id\":\"a\",\"age\":3}\n{\"id\":\"b\",\"age\":2}\n"
    );
    let stats: Vec<(&str, u64, u64)> = reduced
        .stats
        .iter()
        .map(|s| (s.stage.as_str(), s.records_in, s.records_out))
        .collect();
    assert_eq!(stats, [("dedup", 3, 2)]);
}

#[test]
fn dedup_treats_missing_key_fields_as_null() {
    let p = pipeline(&[("dedup", &[("key", "k")])]).unwrap();
    let out = p
        .run_map(
            &jsonl(b"{\"v\":1}\n{\"k\":null,\"v\":2}\n{\"k\":1,\"v\":3}\n"),
            1,
        )
        .unwrap();
    let reduced = p.run_reduce(&[&out.partitions[0]]).unwrap();
    // No ts: between the two null-keyed records the greater encoding wins.
    assert_eq!(text(&reduced.output), "{\"k\":1,\"v\":3}\n{\"v\":1}\n");
}

#[test]
fn the_map_side_writes_each_partition_sorted_by_key() {
    let records = generate(2_000, 300, 5);
    let p = pipeline(&[("dedup", &[("key", "id,region"), ("ts", "ts")])]).unwrap();
    let out = p.run_map(&jsonl(&to_jsonl(&records)), 3).unwrap();
    let mut lines = 0;
    for partition in &out.partitions {
        let keys: Vec<&str> = text(partition)
            .lines()
            .map(|l| l.split('\t').next().unwrap())
            .collect();
        assert!(keys.windows(2).all(|w| w[0] <= w[1]), "{keys:?}");
        lines += keys.len();
    }
    assert_eq!(lines, records.len());
    // Lines with one key stay in input order: `seq` rises among them.
    for partition in &out.partitions {
        let mut last: Option<(Value, u64)> = None;
        for (key, _, record) in shuffled(partition) {
            let seq = record["seq"].as_u64().unwrap();
            if let Some((k, s)) = &last
                && *k == key
            {
                assert!(*s < seq);
            }
            last = Some((key, seq));
        }
    }
    // An input out of key order is refused, naming where.
    let err = p
        .run_reduce(&[b"[\"b\"]\t1\t{}\n[\"a\"]\t1\t{}\n"])
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("reduce input 0, line 2: shuffle lines out of key order"),
        "{err}"
    );
}

/// The map side's batches do not show in what it writes: batches of 1, 7 and 1024 records
/// give the output, shuffle buffers, rejects and record counts of the whole chunk at once,
/// for JSONL and CSV, with rejects from parsing and from stages, and with records a `map`
/// stage rewrites.
#[test]
fn map_batches_do_not_change_the_output() {
    let mut lines = Vec::new();
    for (i, r) in generate(2500, 300, 11).iter().enumerate() {
        match i % 211 {
            5 => lines.extend_from_slice(b"not json\n"),
            9 => lines.extend_from_slice(b"\n"),
            17 => lines.extend_from_slice(b"[1,2]\n"),
            _ => {}
        }
        let mut line = serde_json::to_vec(r).unwrap();
        if i % 13 == 0 {
            // A tab between tokens: written as compact JSON in a shuffle line.
            line.insert(1, b'\t');
        }
        lines.extend(line);
        lines.push(b'\n');
    }
    let schema = r#"{"type":"object","required":["ts"]}"#;
    let mut csv_data = b"id,region,n\n".to_vec();
    for i in 0..2300 {
        if i % 97 == 3 {
            csv_data.extend_from_slice(b"short\n");
        }
        csv_data.extend_from_slice(format!("u{},\"r\n{}\",{}\n", i % 50, i % 3, i).as_bytes());
    }
    let pipelines = [
        pipeline(&[("validate", &[("schema", schema)])]).unwrap(),
        pipeline(&[
            ("validate", &[("schema", schema)]),
            ("dedup", &[("key", "id"), ("ts", "ts")]),
        ])
        .unwrap(),
        pipeline(&[
            (
                "map",
                &[("spec", r#"{"rename":{"seq":"n"},"cast":{"n":"int"}}"#)],
            ),
            ("filter", &[("where", "n > 100")]),
            ("dedup", &[("key", "region,id")]),
        ])
        .unwrap(),
    ];
    let inputs = [jsonl(&lines), csv(&csv_data, None, true)];
    for p in &pipelines {
        for input in &inputs {
            let whole = p.run_map_batched(input, 3, usize::MAX).unwrap();
            assert!(whole.stats[0].records_in > 2000);
            for batch in [1, 7, MAP_BATCH] {
                let out = p.run_map_batched(input, 3, batch).unwrap();
                assert_eq!(text(&out.output), text(&whole.output), "batch {batch}");
                assert_eq!(out.partitions, whole.partitions, "batch {batch}");
                assert_eq!(text(&out.rejects), text(&whole.rejects), "batch {batch}");
                let counts = |o: &MapOutput| {
                    o.stats
                        .iter()
                        .map(|s| (s.stage.clone(), s.records_in, s.records_out, s.bytes_in))
                        .collect::<Vec<_>>()
                };
                assert_eq!(counts(&out), counts(&whole), "batch {batch}");
            }
        }
    }
}
