//! Reading a plan: YAML text -> `--set` overrides -> typed [`Plan`], with errors that name the file,
//! the step and the key, and suggest the closest valid key.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_yaml::{Mapping, Value};

use super::spec::{Plan, Step, OPERATORS, PLAN_KEYS};
use crate::error::{closest, Error, PlanError, PlanLocation, Result};

/// Load a plan file and apply `KEY=VALUE` overrides.
pub fn load_file(path: &Path, sets: &[String]) -> Result<Plan> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path.display(), e))?;
    load_str(&text, &path.display().to_string(), sets)
}

/// Load a plan from text; `file` names it in error messages.
pub fn load_str(text: &str, file: &str, sets: &[String]) -> Result<Plan> {
    let at = |step: Option<(usize, String)>, key: Option<String>| PlanLocation {
        file: file.to_string(),
        step,
        key,
    };
    let err = |step, key, message: String, suggestion| -> Error {
        PlanError {
            at: at(step, key),
            message,
            suggestion,
        }
        .into()
    };

    let mut root: Value = serde_yaml::from_str(text)
        .map_err(|e| err(None, None, format!("malformed YAML: {e}"), None))?;
    let Value::Mapping(map) = &mut root else {
        return Err(err(
            None,
            None,
            "a plan must be a mapping with `name` and `steps`".into(),
            None,
        ));
    };
    normalize_steps(map, file)?;
    for set in sets {
        apply_set(map, set, file)?;
    }

    for key in map.keys() {
        let k = key_name(key);
        if !PLAN_KEYS.contains(&k.as_str()) {
            let hint = closest(&k, PLAN_KEYS.iter().copied());
            return Err(err(
                None,
                Some(k),
                format!("unknown key; valid keys: {}", PLAN_KEYS.join(", ")),
                hint,
            ));
        }
    }

    let name = match map.get("name") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(_) => {
            return Err(err(
                None,
                Some("name".into()),
                "expected a non-empty string".into(),
                None,
            ))
        }
        None => {
            return Err(err(
                None,
                Some("name".into()),
                "missing required key".into(),
                None,
            ))
        }
    };
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(err(
            None,
            Some("name".into()),
            format!("`{name}`: use letters, digits, `-` and `_` (it names the output table in `conala sql`)"),
            None,
        ));
    }
    let description = match map.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err(err(
                None,
                Some("description".into()),
                "expected a string".into(),
                None,
            ))
        }
    };
    let model = match map.get("model") {
        None | Some(Value::Null) => None,
        Some(v) => Some(typed(v.clone(), &at(None, None), "model")?),
    };
    let Some(Value::Sequence(raw_steps)) = map.get("steps") else {
        return Err(err(
            None,
            Some("steps".into()),
            "missing or not a list of steps".into(),
            None,
        ));
    };
    if raw_steps.is_empty() {
        return Err(err(
            None,
            Some("steps".into()),
            "a plan needs at least a source and a sink".into(),
            None,
        ));
    }
    let mut steps = Vec::with_capacity(raw_steps.len());
    for (i, raw) in raw_steps.iter().enumerate() {
        let (op, body) = step_parts(raw, i, file)?;
        let loc = at(Some((i, op.clone())), None);
        let step = match op.as_str() {
            "source" => Step::Source(typed(body, &loc, "")?),
            "filter" => Step::Filter(typed(body, &loc, "")?),
            "format" => Step::Format(typed(body, &loc, "")?),
            "tokenize" => Step::Tokenize(typed(body, &loc, "")?),
            "generate" => Step::Generate(typed(body, &loc, "")?),
            "evaluate" => Step::Evaluate(typed(body, &loc, "")?),
            "train" => Step::Train(Box::new(typed(body, &loc, "")?)),
            "write" => Step::Write(typed(body, &loc, "")?),
            _ => unreachable!("step_parts checks operator names"),
        };
        steps.push(step);
    }
    Ok(Plan {
        name,
        description,
        model,
        steps,
        file: file.to_string(),
    })
}

fn key_name(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

/// A step is a one-key mapping `operator: settings`. Returns (operator, settings).
fn step_parts(raw: &Value, i: usize, file: &str) -> Result<(String, Value)> {
    let loc = |op: Option<String>| PlanLocation {
        file: file.into(),
        step: op.map(|o| (i, o)),
        key: None,
    };
    let bad = |op, message: String, suggestion| -> Error {
        PlanError {
            at: loc(op),
            message,
            suggestion,
        }
        .into()
    };
    let Value::Mapping(m) = raw else {
        return Err(bad(
            Some("?".into()),
            "a step is `- OPERATOR: settings` (operators: ".to_string()
                + &OPERATORS.join(", ")
                + ")",
            None,
        ));
    };
    if m.len() != 1 {
        let names: Vec<String> = m.keys().map(key_name).collect();
        return Err(bad(
            Some(names.join("+")),
            format!(
                "a step names exactly one operator, found {} keys: {}",
                m.len(),
                names.join(", ")
            ),
            None,
        ));
    }
    let (k, v) = m.iter().next().expect("one entry");
    let op = key_name(k);
    if !OPERATORS.contains(&op.as_str()) {
        let hint = closest(&op, OPERATORS.iter().copied());
        return Err(bad(
            Some(op),
            format!("unknown operator; operators: {}", OPERATORS.join(", ")),
            hint,
        ));
    }
    Ok((op, v.clone()))
}

/// `filter: "expr"` is shorthand for `filter: { predicate: "expr" }`; expand it so `--set` can address keys.
fn normalize_steps(map: &mut Mapping, _file: &str) -> Result<()> {
    if let Some(Value::Sequence(steps)) = map.get_mut("steps") {
        for step in steps.iter_mut() {
            if let Value::Mapping(m) = step {
                if let Some(v @ Value::String(_)) = m.get_mut("filter") {
                    let mut inner = Mapping::new();
                    inner.insert("predicate".into(), v.clone());
                    *v = Value::Mapping(inner);
                }
            }
        }
    }
    Ok(())
}

/// Apply one `KEY=VALUE` override. KEY is a dotted path: a top-level key (`name`, `model.path`), or a
/// step addressed by its operator name (`write.path`, `train.eval.source.split`) or number
/// (`steps.6.path`, 1-based). VALUE is read as YAML (`128` is a number, `null` is null).
pub fn apply_set(map: &mut Mapping, set: &str, file: &str) -> Result<()> {
    let fail = |message: String, suggestion: Option<String>| -> Error {
        PlanError {
            at: PlanLocation {
                file: file.into(),
                step: None,
                key: None,
            },
            message: format!("--set {set}: {message}"),
            suggestion,
        }
        .into()
    };
    let Some((path, raw_value)) = set.split_once('=') else {
        return Err(fail("expected KEY=VALUE".into(), None));
    };
    let value: Value = if raw_value.is_empty() {
        Value::String(String::new())
    } else {
        serde_yaml::from_str(raw_value).unwrap_or_else(|_| Value::String(raw_value.to_string()))
    };
    let parts: Vec<&str> = path.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(fail("empty key segment".into(), None));
    }
    let head = parts[0];
    let steps: Vec<String> = match map.get("steps") {
        Some(Value::Sequence(s)) => s
            .iter()
            .map(|st| match st {
                Value::Mapping(m) => m.keys().next().map(key_name).unwrap_or_default(),
                _ => String::new(),
            })
            .collect(),
        _ => vec![],
    };

    // Which node the rest of the path lives in.
    let (target, rest): (&mut Value, &[&str]) = if PLAN_KEYS.contains(&head) && head != "steps" {
        if parts.len() == 1 {
            map.insert(head.into(), value);
            return Ok(());
        }
        let entry = map
            .entry(head.into())
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        (entry, &parts[1..])
    } else {
        let index = if head == "steps" {
            let n: usize = parts
                .get(1)
                .and_then(|p| p.parse().ok())
                .filter(|n| *n >= 1 && *n <= steps.len())
                .ok_or_else(|| {
                    fail(
                        format!("`steps.N` needs a step number from 1 to {}", steps.len()),
                        None,
                    )
                })?;
            n - 1
        } else {
            let matches: Vec<usize> = steps
                .iter()
                .enumerate()
                .filter(|(_, s)| s.as_str() == head)
                .map(|(i, _)| i)
                .collect();
            match matches.as_slice() {
                [i] => *i,
                [] => {
                    let mut names: Vec<&str> = steps.iter().map(|s| s.as_str()).collect();
                    names.extend(PLAN_KEYS.iter().filter(|k| **k != "steps"));
                    let hint = closest(head, names.iter().copied());
                    return Err(fail(
                        format!(
                            "names nothing: no top-level key or step `{head}` (steps: {})",
                            steps.join(", ")
                        ),
                        hint,
                    ));
                }
                many => {
                    let nums: Vec<String> =
                        many.iter().map(|i| format!("steps.{}", i + 1)).collect();
                    return Err(fail(
                        format!("`{head}` is ambiguous; address one of: {}", nums.join(", ")),
                        None,
                    ));
                }
            }
        };
        let skip = if head == "steps" { 2 } else { 1 };
        let Some(Value::Sequence(seq)) = map.get_mut("steps") else {
            unreachable!("steps listed above")
        };
        let Value::Mapping(step) = &mut seq[index] else {
            unreachable!("named steps are mappings")
        };
        let body = step.values_mut().next().expect("one operator key");
        if parts.len() == skip {
            *body = value;
            return Ok(());
        }
        (body, &parts[skip..])
    };

    let mut node = target;
    for (i, seg) in rest.iter().enumerate() {
        if !matches!(node, Value::Mapping(_)) {
            if matches!(node, Value::Null) {
                *node = Value::Mapping(Mapping::new());
            } else {
                return Err(fail(
                    format!("`{}` is not a mapping", rest[..i].join(".")),
                    None,
                ));
            }
        }
        let Value::Mapping(m) = node else {
            unreachable!()
        };
        if i + 1 == rest.len() {
            m.insert((*seg).into(), value);
            return Ok(());
        }
        node = m
            .entry((*seg).into())
            .or_insert_with(|| Value::Mapping(Mapping::new()));
    }
    Ok(())
}

/// Deserialize `value` into `T`, turning serde's messages into plan errors with a key path.
#[allow(clippy::result_large_err)] // called once per plan key at load time; the error is the product
pub(crate) fn typed<T: DeserializeOwned>(
    value: Value,
    loc: &PlanLocation,
    prefix: &str,
) -> Result<T, PlanError> {
    let join = |a: &str, b: &str| match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{a}.{b}"),
    };
    // An empty step body (`- write:`) means "all defaults": let serde report what is missing.
    let value = if value.is_null() {
        Value::Mapping(Mapping::new())
    } else {
        value
    };
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let msg = e.inner().to_string();
        let mut at = loc.clone();
        if let Some(rest) = msg.strip_prefix("unknown field `") {
            let field = rest.split('`').next().unwrap_or("").to_string();
            let expected: Vec<String> = rest
                .split('`')
                .skip(2)
                .step_by(2)
                .map(str::to_string)
                .collect();
            let parent = path
                .strip_suffix(&field)
                .map(|p| p.trim_end_matches('.'))
                .unwrap_or(&path);
            at.key = Some(join(&join(prefix, parent), &field));
            let hint = closest(&field, expected.iter().map(|s| s.as_str()));
            let valid = if expected.is_empty() {
                String::new()
            } else {
                format!("; valid keys: {}", expected.join(", "))
            };
            return PlanError {
                at,
                message: format!("unknown key{valid}"),
                suggestion: hint,
            };
        }
        if let Some(rest) = msg.strip_prefix("missing field `") {
            let field = rest.split('`').next().unwrap_or("");
            at.key = Some(join(&join(prefix, &path), field));
            return PlanError {
                at,
                message: "missing required key".into(),
                suggestion: None,
            };
        }
        let key = join(prefix, &path);
        at.key = if key.is_empty() { None } else { Some(key) };
        PlanError {
            at,
            message: humanize(&msg),
            suggestion: None,
        }
    })
}

/// serde speaks Rust types; plans speak YAML.
fn humanize(msg: &str) -> String {
    let msg = msg.split(" at line ").next().unwrap_or(msg);
    msg.replace("expected usize", "expected a non-negative integer")
        .replace("expected u64", "expected a non-negative integer")
        .replace("expected f64", "expected a number")
        .replace("invalid type: ", "wrong type: ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN: &str = r#"
name: conala-mined
model: { path: google/flan-t5-base }
steps:
  - source: { uri: hf://datasets/neulab/conala, config: mined, split: train }
  - filter: "intent IS NOT NULL AND snippet IS NOT NULL"
  - format: { input: "{intent}\n{snippet}" }
  - tokenize: { input: input, max_input_tokens: 512 }
  - generate: { output: rewritten_intent, max_new_tokens: 100, temperature: 0.2, top_p: 0.9, repetition_penalty: 1.2 }
  - write: { path: out/conala-mined }
"#;

    fn load(text: &str, sets: &[&str]) -> Result<Plan> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        load_str(text, "p.yaml", &sets)
    }

    fn plan_err(r: Result<Plan>) -> PlanError {
        match r {
            Err(Error::Plan(p)) => *p,
            other => panic!("expected a plan error, got {other:?}"),
        }
    }

    #[test]
    fn parses_the_mined_plan_as_written() {
        let p = load(PLAN, &[]).unwrap();
        assert_eq!(p.name, "conala-mined");
        assert_eq!(p.model.as_ref().unwrap().path, "google/flan-t5-base");
        let ops: Vec<_> = p.steps.iter().map(|s| s.operator()).collect();
        assert_eq!(
            ops,
            ["source", "filter", "format", "tokenize", "generate", "write"]
        );
        let Step::Format(f) = &p.steps[2] else {
            panic!()
        };
        assert_eq!(
            f.entries().collect::<Vec<_>>(),
            vec![("input", "{intent}\n{snippet}")]
        );
        let Step::Generate(g) = &p.steps[4] else {
            panic!()
        };
        assert_eq!(
            (g.max_new_tokens, g.temperature, g.top_p),
            (100, Some(0.2), Some(0.9))
        );
        assert_eq!(g.repetition_penalty, 1.2);
        let Step::Filter(f) = &p.steps[1] else {
            panic!()
        };
        assert_eq!(f.predicate, "intent IS NOT NULL AND snippet IS NOT NULL");
    }

    #[test]
    fn set_overrides_by_operator_name_and_types_values() {
        let p = load(
            PLAN,
            &[
                "write.path=out/x",
                "source.split=test",
                "tokenize.max_input_tokens=128",
                "model.path=m",
            ],
        )
        .unwrap();
        let Step::Write(w) = &p.steps[5] else {
            panic!()
        };
        assert_eq!(w.path, "out/x");
        let Step::Source(s) = &p.steps[0] else {
            panic!()
        };
        assert_eq!(s.split.as_deref(), Some("test"));
        let Step::Tokenize(t) = &p.steps[3] else {
            panic!()
        };
        assert_eq!(t.max_input_tokens, 128);
        assert_eq!(p.model.unwrap().path, "m");
        let p = load(
            PLAN,
            &["steps.2.predicate=intent IS NULL", "filter=snippet IS NULL"],
        )
        .unwrap();
        let Step::Filter(f) = &p.steps[1] else {
            panic!()
        };
        assert_eq!(f.predicate, "snippet IS NULL");
    }

    #[test]
    fn set_that_names_nothing_is_an_error() {
        let e = plan_err(load(PLAN, &["wirte.path=x"]));
        assert!(e.message.contains("names nothing"), "{e}");
        assert_eq!(e.suggestion.as_deref(), Some("write"));
        let e = plan_err(load(PLAN, &["novalue"]));
        assert!(e.message.contains("KEY=VALUE"), "{e}");
        let e = plan_err(load(PLAN, &["steps.9.path=x"]));
        assert!(e.message.contains("from 1 to 6"), "{e}");
    }

    #[test]
    fn unknown_key_names_step_and_suggests() {
        let text = PLAN.replace("max_input_tokens: 512", "max_input_token: 512");
        let e = plan_err(load(&text, &[]));
        assert_eq!(e.at.step, Some((3, "tokenize".to_string())));
        assert_eq!(e.at.key.as_deref(), Some("max_input_token"));
        assert_eq!(e.suggestion.as_deref(), Some("max_input_tokens"));
        let shown = e.to_string();
        assert!(
            shown.starts_with("p.yaml: step 4 (tokenize): key `max_input_token`: unknown key"),
            "{shown}"
        );
    }

    #[test]
    fn set_of_unknown_key_inside_step_is_reported_with_suggestion() {
        let e = plan_err(load(PLAN, &["source.splt=test"]));
        assert_eq!(e.at.key.as_deref(), Some("splt"));
        assert_eq!(e.suggestion.as_deref(), Some("split"));
    }

    #[test]
    fn wrong_type_and_missing_key() {
        let e = plan_err(load(
            &PLAN.replace("max_input_tokens: 512", "max_input_tokens: lots"),
            &[],
        ));
        assert_eq!(e.at.key.as_deref(), Some("max_input_tokens"));
        assert!(e.message.contains("non-negative integer"), "{e}");
        let e = plan_err(load(
            &PLAN.replace("{ path: out/conala-mined }", "{ rows_per_file: 10 }"),
            &[],
        ));
        assert_eq!(e.at.key.as_deref(), Some("path"));
        assert!(e.message.contains("missing required key"), "{e}");
    }

    #[test]
    fn nested_unknown_key_has_full_path() {
        let text = "name: t\nsteps:\n  - source: { uri: x }\n  - train: { output: o, lora: { r: 8, alpah: 16 } }\n";
        let e = plan_err(load(text, &[]));
        assert_eq!(e.at.key.as_deref(), Some("lora.alpah"));
        assert_eq!(e.suggestion.as_deref(), Some("alpha"));
    }

    #[test]
    fn lora_null_means_full_finetune_and_absent_means_default() {
        let t = "name: t\nsteps:\n  - source: { uri: x }\n  - train: { output: o, lora: null }\n";
        let Step::Train(tr) = &load(t, &[]).unwrap().steps[1] else {
            panic!()
        };
        assert!(tr.lora.is_none());
        let t = "name: t\nsteps:\n  - source: { uri: x }\n  - train: { output: o }\n";
        let Step::Train(tr) = &load(t, &[]).unwrap().steps[1] else {
            panic!()
        };
        assert_eq!(tr.lora.as_ref().unwrap().targets, vec!["q", "v"]);
    }

    #[test]
    fn malformed_yaml_and_unknown_operator() {
        let e = plan_err(load("name: [unclosed\nsteps: x", &[]));
        assert!(e.message.starts_with("malformed YAML"), "{e}");
        let e = plan_err(load("name: t\nsteps:\n  - sorce: { uri: x }\n", &[]));
        assert_eq!(e.suggestion.as_deref(), Some("source"));
        assert_eq!(e.at.step, Some((0, "sorce".to_string())));
        let e = plan_err(load("name: t\nstesp: []\n", &[]));
        assert_eq!(e.suggestion.as_deref(), Some("steps"));
    }
}
