//! `conala run` and `conala validate`.

use crate::cli::output::out;
use conala::progress::human_bytes as gib;
use std::path::PathBuf;

use anyhow::{Context as _, Result};

use super::args::{RunArgs, ValidateArgs};
use super::report::print_summary;
use conala::context::{Context, Shard};
use conala::model::DeviceChoice;
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

pub async fn validate(a: ValidateArgs) -> Result<()> {
    let plan = plans::load_file(&a.plan, &a.sets)?;
    let mut ctx = Context::from_env()?;
    ctx.plan_only = true;
    let pipeline = plans::build(&plan, &ctx).await?;
    out!("{}: valid plan `{}`", a.plan.display(), plan.name);
    for (step, cols) in pipeline.describe() {
        out!(
            "  {step}: {}",
            if cols.is_empty() {
                "(sink)".to_string()
            } else {
                cols.join(", ")
            }
        );
    }
    let estimates = pipeline.memory_estimates();
    if !estimates.is_empty() {
        // The lengths are the plan's maximums (tokenize's max_input_tokens / max_target_tokens), so a
        // plan that fits here fits every batch the data can make.
        out!("estimated peak memory per device, every row at the plan's maximum lengths:");
    }
    let mut too_big = vec![];
    for (step, m) in &estimates {
        // `auto` as it resolves here.
        let devices: Vec<String> = m
            .devices
            .iter()
            .map(|d| match d {
                DeviceChoice::Auto if d.is_cuda() => "cuda:0 (auto)".to_string(),
                DeviceChoice::Auto => "cpu (auto)".to_string(),
                d => d.to_string(),
            })
            .collect();
        out!("  {step}: {}", m.what);
        for (part, bytes) in &m.parts {
            out!("    {part:<40} {:>10}", gib(*bytes));
        }
        out!(
            "    {:<40} {:>10}  on {}{}",
            "peak",
            gib(m.peak),
            if devices.len() > 1 { "each of " } else { "" },
            devices.join(", ")
        );
        for (other, bytes) in &m.alternatives {
            out!("    {:<40} {:>10}", format!("(with {other})"), gib(*bytes));
        }
        let device = m.devices.first().copied().unwrap_or_default();
        let (capacity, whose) = match a.device_memory {
            Some(c) => (Some(c), "--device-memory".to_string()),
            None if device.is_cuda() => (device.total_memory(), format!("{}'s memory", devices[0])),
            None => (device.total_memory(), "this machine's RAM".to_string()),
        };
        match capacity {
            Some(c) if m.peak > c => {
                out!("    does NOT fit: {} > {} ({whose})", gib(m.peak), gib(c));
                too_big.push(format!(
                    "step {step} needs about {} per device, more than the {} of {whose}{}",
                    gib(m.peak),
                    gib(c),
                    fit_hint(m, c)
                ));
            }
            Some(c) => out!("    fits: {} of {} ({whose})", gib(m.peak), gib(c)),
            None => {
                out!("    {device} is not on this machine: give --device-memory to check the fit")
            }
        }
    }
    if !too_big.is_empty() {
        anyhow::bail!("{}", too_big.join("; "));
    }
    Ok(())
}

/// What would make a step fit `capacity`: a cheaper alternative that does, else the usual levers.
fn fit_hint(m: &conala::operators::MemoryEstimate, capacity: u64) -> String {
    match m.alternatives.iter().find(|(_, b)| *b <= capacity) {
        Some((other, b)) => format!(": with {other} it needs {}", gib(*b)),
        None => format!(
            ": use more devices (train.devices), a smaller batch, or lower max_input_tokens / max_target_tokens{}",
            if m.dtype == candle_core::DType::F32 { ", or bf16" } else { "" }
        ),
    }
}
