//! `--set KEY=VALUE` overrides on a plan's YAML, before it is typed: applying one, and telling which
//! plans of a run one names something in.

use serde_yaml::{Mapping, Value};

use super::spec::PLAN_KEYS;
use crate::error::{closest, Error, PlanError, PlanLocation, Result};

/// A YAML key as text.
pub(super) fn key_name(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

/// Apply one `KEY=VALUE` override. KEY is a dotted path: a top-level key (`name`, `model.path`), or a
/// step addressed by its operator name (`write.path`, `train.eval.source.split`) or number
/// (`steps.6.path`, 1-based). VALUE is read as YAML (`128` is a number, `null` is null).
pub(super) fn apply_set(map: &mut Mapping, set: &str, file: &str) -> Result<()> {
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
    let steps = step_names(map);

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

/// The operator names of a plan's steps, in order.
fn step_names(map: &Mapping) -> Vec<String> {
    match map.get("steps") {
        Some(Value::Sequence(s)) => s
            .iter()
            .map(|st| match st {
                Value::Mapping(m) => m.keys().next().map(key_name).unwrap_or_default(),
                _ => String::new(),
            })
            .collect(),
        _ => vec![],
    }
}

/// Whether the override's key names something in the plan: a top-level key, a step by its
/// operator, or `steps.N` with a step N.
pub(super) fn names_something(text: &str, set: &str) -> bool {
    let Ok(Value::Mapping(map)) = serde_yaml::from_str::<Value>(text) else {
        return false;
    };
    let key = set.split_once('=').map_or(set, |(k, _)| k);
    let mut parts = key.split('.');
    let head = parts.next().unwrap_or("");
    let steps = step_names(&map);
    match head {
        "steps" => parts
            .next()
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| n >= 1 && n <= steps.len()),
        h if PLAN_KEYS.contains(&h) => true,
        h => steps.iter().any(|s| s == h),
    }
}
