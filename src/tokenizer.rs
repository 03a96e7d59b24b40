//! Tokenizers: finding a `tokenizer.json` (a file, a model folder, or a Hub model) and training the
//! project's own T5-style Unigram tokenizer on text columns.

use std::path::{Path, PathBuf};

use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::unigram::{Unigram, UnigramTrainer};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::{NormalizerWrapper, Replace, Sequence, Strip, NFKC};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, ModelWrapper, Tokenizer};

use crate::error::{Error, Result};
use crate::hub::{looks_like_repo_id, Hub, RepoId};

/// T5's special tokens and their ids.
pub const PAD: &str = "<pad>";
pub const EOS: &str = "</s>";
pub const UNK: &str = "<unk>";
pub const PAD_ID: u32 = 0;
pub const EOS_ID: u32 = 1;

/// Where a tokenizer comes from: a tokenizer.json file, a folder holding one, or a Hub model id.
pub async fn resolve_tokenizer_file(
    spec: &str,
    revision: Option<&str>,
    hub: &Hub,
) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.is_file() {
        return Ok(p.to_path_buf());
    }
    if p.is_dir() {
        let f = p.join("tokenizer.json");
        if f.is_file() {
            return Ok(f);
        }
        return Err(Error::Tokenizer(format!(
            "{spec}: the folder has no tokenizer.json"
        )));
    }
    if looks_like_repo_id(spec) && !spec.ends_with(".json") {
        return hub
            .fetch(
                &RepoId::model(spec),
                revision.unwrap_or("main"),
                "tokenizer.json",
            )
            .await;
    }
    Err(Error::Tokenizer(format!(
        "{spec}: no such tokenizer.json file, folder, or Hub model id"
    )))
}

pub fn load(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path).map_err(|e| {
        Error::Tokenizer(format!(
            "{}: not a usable tokenizer.json: {e}",
            path.display()
        ))
    })
}

/// Settings of [`train`].
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub vocab_size: u32,
    pub max_piece_length: usize,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            vocab_size: 8000,
            max_piece_length: 16,
        }
    }
}

/// Train a T5-style Unigram tokenizer: `<pad>`=0, `</s>`=1, `<unk>`=2, NFKC with whitespace collapsed,
/// Metaspace pre-tokenization, and `</s>` appended to every sequence (as T5's tokenizer does).
pub fn train<I, S>(texts: I, options: &TrainOptions) -> Result<Tokenizer>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    let terr = |e: tokenizers::Error| Error::Tokenizer(format!("training the tokenizer: {e}"));
    let specials: Vec<AddedToken> = [PAD, EOS, UNK]
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let trainer = UnigramTrainer::builder()
        .vocab_size(options.vocab_size)
        .special_tokens(specials)
        .unk_token(Some(UNK.to_string()))
        .max_piece_length(options.max_piece_length)
        .show_progress(false)
        .build()
        .map_err(|e| Error::Tokenizer(format!("tokenizer trainer: {e}")))?;
    let mut tok = Tokenizer::new(ModelWrapper::Unigram(Unigram::default()));
    let collapse = Replace::new(
        tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
        " ",
    )
    .map_err(terr)?;
    tok.with_normalizer(Some(NormalizerWrapper::Sequence(Sequence::new(vec![
        NormalizerWrapper::NFKC(NFKC),
        NormalizerWrapper::Replace(collapse),
        NormalizerWrapper::StripNormalizer(Strip::new(true, true)),
    ]))))
    .map_err(terr)?;
    let metaspace = Metaspace::new('\u{2581}', PrependScheme::Always, true);
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Metaspace(metaspace.clone())));
    tok.with_decoder(Some(DecoderWrapper::Metaspace(metaspace)));
    let mut trainer = TrainerWrapper::UnigramTrainer(trainer);
    tok.train(&mut trainer, texts).map_err(terr)?;
    let post = TemplateProcessing::builder()
        .try_single(format!("$A {EOS}"))
        .and_then(|b| b.try_pair(format!("$A {EOS} $B {EOS}")))
        .map_err(|e| Error::Tokenizer(format!("post-processor: {e}")))?
        .special_tokens(vec![(EOS, EOS_ID)])
        .build()
        .map_err(|e| Error::Tokenizer(format!("post-processor: {e}")))?;
    tok.with_post_processor(Some(post));
    for (name, id) in [(PAD, PAD_ID), (EOS, EOS_ID), (UNK, 2)] {
        if tok.token_to_id(name) != Some(id) {
            return Err(Error::Tokenizer(format!(
                "trained tokenizer has {name} at {:?}, expected {id}",
                tok.token_to_id(name)
            )));
        }
    }
    Ok(tok)
}

pub fn save(tok: &Tokenizer, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display(), e))?;
    }
    tok.save(path, true)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trains_t5_style_special_tokens_and_appends_eos() {
        let texts: Vec<String> = (0..200)
            .map(|i| {
                format!("how to sort a list number {i} in python\nsorted(x, key=lambda v: v[{i}])")
            })
            .collect();
        let tok = train(
            texts.iter(),
            &TrainOptions {
                vocab_size: 150,
                max_piece_length: 8,
            },
        )
        .unwrap();
        assert_eq!(tok.token_to_id("<pad>"), Some(0));
        assert_eq!(tok.token_to_id("</s>"), Some(1));
        assert_eq!(tok.token_to_id("<unk>"), Some(2));
        let enc = tok.encode("sort a   list\nin python", true).unwrap();
        assert_eq!(*enc.get_ids().last().unwrap(), EOS_ID);
        let text = tok.decode(enc.get_ids(), true).unwrap();
        assert_eq!(text, "sort a list in python");
    }
}
