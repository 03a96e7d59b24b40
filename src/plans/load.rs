//! Reading a plan: YAML text -> `--set` overrides -> typed [`Plan`], with errors that name the file,
//! the step and the key, and suggest the closest valid key.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_yaml::{Mapping, Value};

use super::overrides::{apply_set, key_name, names_something};
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
        if let Some((value, expected)) = unknown_name(&msg) {
            return PlanError {
                at,
                message: format!("unknown value `{value}` (one of: {})", expected.join(", ")),
                suggestion: closest(&value, expected.iter().map(String::as_str)),
            };
        }
        PlanError {
            at,
            message: humanize(&msg),
            suggestion: None,
        }
    })
}

/// The value and the valid names in serde's "unknown variant `x`, expected one of `a`, `b`" (also
/// "expected `a` or `b`"), which every named setting reports.
fn unknown_name(msg: &str) -> Option<(String, Vec<String>)> {
    let rest = msg.strip_prefix("unknown variant `")?;
    let (value, rest) = rest.split_once('`')?;
    let expected = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    Some((value.to_string(), expected))
}

/// serde speaks Rust types; plans speak YAML.
fn humanize(msg: &str) -> String {
    let msg = msg.split(" at line ").next().unwrap_or(msg);
    msg.replace("expected usize", "expected a non-negative integer")
        .replace("expected u64", "expected a non-negative integer")
        .replace("expected f64", "expected a number")
        .replace("invalid type: ", "wrong type: ")
}

/// Load the plans of one run: `(name for messages, YAML text)` each, with `--set` overrides. With
/// several plans an override may start with a plan's name (`conala-offline.write.path=…`) to reach
/// that plan only; otherwise it applies to every plan whose steps or keys it names, and must name
/// something in at least one.
pub fn load_plans(texts: &[(String, String)], sets: &[String]) -> Result<Vec<Plan>> {
    if texts.len() == 1 {
        return Ok(vec![load_str(&texts[0].1, &texts[0].0, sets)?]);
    }
    let bare: Vec<Plan> = texts
        .iter()
        .map(|(n, t)| load_str(t, n, &[]))
        .collect::<Result<_>>()?;
    let mut per_plan: Vec<Vec<String>> = vec![vec![]; bare.len()];
    for set in sets {
        if let Some(i) = bare
            .iter()
            .position(|p| set.starts_with(&format!("{}.", p.name)))
        {
            per_plan[i].push(set[bare[i].name.len() + 1..].to_string());
            continue;
        }
        let mut hit = false;
        for (i, (_, t)) in texts.iter().enumerate() {
            if names_something(t, set) {
                per_plan[i].push(set.clone());
                hit = true;
            }
        }
        if !hit {
            // Report it as the first plan sees it ("names nothing", with a suggestion).
            load_str(&texts[0].1, &texts[0].0, std::slice::from_ref(set))?;
        }
    }
    texts
        .iter()
        .zip(per_plan)
        .map(|((n, t), s)| load_str(t, n, &s))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plans::spec::BatchTokens;

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
    fn batch_tokens_is_a_number_or_auto() {
        let tokens = |sets: &[&str]| match &load(PLAN, sets).unwrap().steps[4] {
            Step::Generate(g) => g.batch_tokens,
            _ => panic!(),
        };
        assert_eq!(tokens(&[]), BatchTokens::Auto);
        assert_eq!(
            tokens(&["generate.batch_tokens=2048"]),
            BatchTokens::Fixed(2048)
        );
        assert_eq!(tokens(&["generate.batch_tokens=auto"]), BatchTokens::Auto);
        let e = plan_err(load(PLAN, &["generate.batch_tokens=lots"]));
        assert_eq!(e.at.key.as_deref(), Some("batch_tokens"));
        assert!(e.message.contains("a number of tokens or `auto`"), "{e}");
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
        // Targets unset: the model family's PEFT default (q, v for T5) is taken when the model is known.
        assert_eq!(tr.lora.as_ref().unwrap().targets, None);
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

    const PREP: &str = "name: prep\nsteps:\n  - source: { uri: a }\n  - write: { path: out/a }\n";
    const TRAIN: &str = "name: tr\nmodel: { path: m }\nsteps:\n  - source: { uri: b }\n  - train: { output: runs/b }\n";

    fn texts() -> Vec<(String, String)> {
        vec![
            ("prep.yaml".into(), PREP.into()),
            ("train.yaml".into(), TRAIN.into()),
        ]
    }

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn overrides_reach_the_plans_they_name() {
        let plans = load_plans(
            &texts(),
            &strings(&[
                "write.path=out/x",
                "train.max_steps=7",
                "source.limit=5",
                "tr.source.uri=c",
            ]),
        )
        .unwrap();
        let Step::Write(w) = &plans[0].steps[1] else {
            panic!()
        };
        assert_eq!(w.path, "out/x");
        let Step::Train(t) = &plans[1].steps[1] else {
            panic!()
        };
        assert_eq!(t.max_steps, 7);
        let (Step::Source(a), Step::Source(b)) = (&plans[0].steps[0], &plans[1].steps[0]) else {
            panic!()
        };
        assert_eq!((a.limit, b.limit), (Some(5), Some(5)));
        assert_eq!((a.uri.as_str(), b.uri.as_str()), ("a", "c"));
    }

    /// An override that names something is checked in that plan: a bad value is reported as the plan
    /// it reaches sees it, not as "names nothing" in another.
    #[test]
    fn a_bad_value_is_reported_by_the_plan_it_reaches() {
        let e = load_plans(&texts(), &strings(&["train.max_steps=lots"])).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("train.yaml") && s.contains("max_steps"), "{s}");
        let e = load_plans(&texts(), &strings(&["trian.max_steps=3"])).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("names nothing"), "{s}");
    }
}
