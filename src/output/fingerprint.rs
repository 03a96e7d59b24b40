//! Is a folder's output this plan's? A resumed run adds rows to what is there, so the rows there must
//! come from the same plan: the same steps with the same settings (model, prompt, decoding) and the
//! same columns. Settings that change speed, not rows (batch sizes, devices, part sizes, the write
//! mode) may differ between runs.

use serde_json::Value;

/// Keys whose values change how fast rows are made, not what they are.
const RUNTIME_KEYS: [&str; 12] = [
    "batch_tokens",
    "max_batch_rows",
    "encoder_batch_tokens",
    "window_rows",
    "keep_order",
    "device",
    "devices",
    "limit",
    "progress",
    "workers",
    "read_ahead",
    "name",
];

/// The first difference between the plan that wrote a folder and this one, as `where: was -> now`;
/// `None` when the output is this plan's. `write` steps are left out (the folder is the write step's).
pub fn plan_difference(before: &Value, now: &Value) -> Option<String> {
    let (a, b) = (comparable(before), comparable(now));
    first_difference(&a, &b, "")
}

/// The plan without `write` steps and runtime settings.
fn comparable(plan: &Value) -> Value {
    let mut v = plan.clone();
    if let Some(steps) = v.get_mut("steps").and_then(Value::as_array_mut) {
        steps.retain(|s| s.get("write").is_none());
    }
    strip(&mut v);
    v
}

fn strip(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for k in RUNTIME_KEYS {
                m.remove(k);
            }
            m.values_mut().for_each(strip);
        }
        Value::Array(a) => a.iter_mut().for_each(strip),
        _ => {}
    }
}

fn first_difference(a: &Value, b: &Value, at: &str) -> Option<String> {
    let here = |k: &str| {
        if at.is_empty() {
            k.to_string()
        } else {
            format!("{at}.{k}")
        }
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter().find_map(|k| match (x.get(k), y.get(k)) {
                (Some(p), Some(q)) => first_difference(p, q, &here(k)),
                (p, q) => Some(format!("{}: {} -> {}", here(k), shown(p), shown(q))),
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (p, q))| first_difference(p, q, &format!("{at}[{i}]"))),
        _ if a == b => None,
        _ => Some(format!(
            "{}: {} -> {}",
            if at.is_empty() { "plan" } else { at },
            shown(Some(a)),
            shown(Some(b))
        )),
    }
}

fn shown(v: Option<&Value>) -> String {
    match v {
        None => "(not set)".to_string(),
        Some(v) => {
            let s = v.to_string();
            match s.char_indices().nth(80) {
                Some((i, _)) => format!("{}…", &s[..i]),
                None => s,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plan(max_new: u64, batch: u64, out: &str) -> Value {
        json!({"name": "gen", "model": {"path": "m", "device": "cpu"}, "steps": [
            {"source": {"uri": "d"}},
            {"generate": {"output": "p", "max_new_tokens": max_new, "max_batch_rows": batch}},
            {"write": {"path": out, "mode": "auto"}}
        ]})
    }

    #[test]
    fn runtime_settings_and_the_write_step_may_differ() {
        assert_eq!(
            plan_difference(&plan(64, 8, "a"), &plan(64, 512, "b")),
            None
        );
    }

    #[test]
    fn a_setting_that_changes_rows_is_named() {
        assert_eq!(
            plan_difference(&plan(64, 8, "a"), &plan(128, 8, "a")).as_deref(),
            Some("steps[1].generate.max_new_tokens: 64 -> 128")
        );
        let other =
            json!({"name": "prep", "steps": [{"source": {"uri": "d"}}, {"write": {"path": "a"}}]});
        let d = plan_difference(&other, &plan(64, 8, "a")).unwrap();
        assert!(d.starts_with("model: (not set) -> "), "{d}");
    }
}
