//! `conala run` and `conala validate`.

use std::path::PathBuf;

use anyhow::{Context as _, Result};

use super::args::{PlanArgs, RunArgs};
use super::report::print_summary;
use conala::context::{Context, Shard};
use conala::plans::{self, Plan};

/// The offline default, run by `conala run` without plan files: prepare the shipped curated split,
/// fine-tune a copy-prior base on it with LoRA, then generate for the test rows and score them.
const DEFAULT_PLANS: [(&str, &str); 3] = [
    (
        "pipelines/conala-offline.yaml",
        include_str!("../../pipelines/conala-offline.yaml"),
    ),
    (
        "pipelines/conala-offline-train.yaml",
        include_str!("../../pipelines/conala-offline-train.yaml"),
    ),
    (
        "pipelines/conala-offline-generate.yaml",
        include_str!("../../pipelines/conala-offline-generate.yaml"),
    ),
];

/// The plans of a run, with `--set` overrides (the built-in default without files).
fn load_plans(files: &[PathBuf], sets: &[String]) -> Result<Vec<Plan>> {
    let texts: Vec<(String, String)> = if files.is_empty() {
        DEFAULT_PLANS
            .iter()
            .map(|(n, t)| (format!("{n} (built in)"), t.to_string()))
            .collect()
    } else {
        files
            .iter()
            .map(|p| {
                Ok((
                    p.display().to_string(),
                    std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?,
                ))
            })
            .collect::<Result<_>>()?
    };
    Ok(plans::load_plans(&texts, sets)?)
}

pub async fn run(a: RunArgs) -> Result<()> {
    let default = a.plans.is_empty();
    let plans = load_plans(&a.plans, &a.sets)?;
    let mut ctx = Context::from_env()?;
    if let Some(s) = &a.shard {
        ctx.shard = Some(Shard::parse(s)?);
    }
    // The built-in default picks up its own earlier run instead of refusing to overwrite it.
    ctx.resume = a.resume || default;
    for plan in &plans {
        let summary = plans::build(plan, &ctx).await?.run(&ctx).await?;
        print_summary(plan, &summary);
    }
    Ok(())
}

pub async fn validate(a: PlanArgs) -> Result<()> {
    let plan = plans::load_file(&a.plan, &a.sets)?;
    let ctx = Context::from_env()?;
    let pipeline = plans::build(&plan, &ctx).await?;
    println!("{}: valid plan `{}`", a.plan.display(), plan.name);
    for (step, cols) in pipeline.describe() {
        println!(
            "  {step}: {}",
            if cols.is_empty() {
                "(sink)".to_string()
            } else {
                cols.join(", ")
            }
        );
    }
    Ok(())
}
