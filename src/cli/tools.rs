//! `conala sql`, `conala tokenizer train`, `conala model init` and `conala merge`.

use crate::cli::output::out;
use anyhow::{bail, Context as _, Result};

use super::args::{MergeArgs, ModelInitArgs, SqlArgs, TokenizerTrainArgs};
use conala::context::Context;
use conala::model::init::{NewModel, Prior};
use conala::model::{DTypeChoice, DeviceChoice, ModelSource};
use conala::operators::source::collect_texts;
use conala::plans;

pub async fn sql(a: SqlArgs) -> Result<()> {
    let ctx = Context::from_env()?;
    if let Some(p) = &a.plan {
        let plan = plans::load_file(p, &a.sets)?;
        conala::sql::register_plan_output(&ctx, &plan).await?;
    } else if !a.sets.is_empty() {
        bail!("--set needs --plan");
    }
    for t in &a.tables {
        let Some((name, uri)) = t.split_once('=') else {
            bail!("--table {t}: expected NAME=PATH_OR_URL");
        };
        conala::sql::register_table(&ctx, name, uri).await?;
    }
    let batches = conala::sql::query(&ctx, &a.query).await?;
    conala::sql::render(&batches, a.format, a.output.as_deref())?;
    Ok(())
}

pub async fn tokenizer_train(a: TokenizerTrainArgs) -> Result<()> {
    let ctx = Context::from_env()?;
    let texts = collect_texts(
        &ctx,
        &a.input,
        a.config.as_deref(),
        a.split.as_deref(),
        &a.columns,
    )
    .await
    .with_context(|| format!("reading {}", a.input))?;
    let options = conala::tokenizer::TrainOptions {
        vocab_size: a.vocab_size,
        ..Default::default()
    };
    let n = texts.len();
    let tok = tokio::task::spawn_blocking(move || conala::tokenizer::train(texts.iter(), &options))
        .await??;
    conala::tokenizer::save(&tok, &a.out)?;
    out!(
        "trained a {}-piece Unigram tokenizer on {n} texts -> {}",
        tok.get_vocab_size(true),
        a.out.display()
    );
    Ok(())
}

pub async fn model_init(a: ModelInitArgs) -> Result<()> {
    let ctx = Context::from_env()?;
    let tokenizer = match &a.vocab {
        Some(p) => p.clone(),
        None => {
            let columns = ["intent", "rewritten_intent", "snippet"].map(String::from);
            let texts = collect_texts(&ctx, "data/conala", Some("curated"), Some("train"), &columns)
                .await
                .context("training a tokenizer on data/conala (run from the repository root, or pass --vocab)")?;
            let tok = tokio::task::spawn_blocking(move || {
                conala::tokenizer::train(texts.iter(), &Default::default())
            })
            .await??;
            let p =
                std::env::temp_dir().join(format!("conala-tokenizer-{}.json", std::process::id()));
            conala::tokenizer::save(&tok, &p)?;
            p
        }
    };
    let new = NewModel {
        family: a.family,
        size: a.size,
        prior: if a.copy_prior {
            Prior::Copy
        } else {
            Prior::Random
        },
        tokenizer,
        seed: a.seed,
    };
    let cfg = new.write(&a.out)?;
    out!(
        "wrote a {} {} model (vocab {}, d_model {}, {} layers) to {}",
        new.prior.describe(a.size),
        a.family,
        cfg.vocab_size,
        cfg.shape.d_model,
        cfg.shape.encoder_layers,
        a.out.display()
    );
    Ok(())
}

pub async fn merge(a: MergeArgs) -> Result<()> {
    let ctx = Context::from_env()?;
    let source = ModelSource {
        adapter: Some(a.adapter.clone()),
        ..ModelSource::at(&a.base, DeviceChoice::Cpu, DTypeChoice::F32)
    };
    let mut loaded = conala::model::load(&source, &ctx.hub).await?;
    conala::model::lora::save_merged(loaded.model.as_mut(), &loaded.files, &a.out)?;
    out!("merged {} + {} -> {}", a.base, a.adapter, a.out.display());
    Ok(())
}
