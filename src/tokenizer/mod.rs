//! Tokenizers: finding a model's tokenizer (a tokenizer.json, or the slow tokenizer files that
//! [`bpe`] and [`sentencepiece`] convert as transformers does; in a file, a model folder, or a Hub
//! model) and training the project's own T5-style Unigram tokenizer on text columns.

mod bpe;
mod sentencepiece;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::Value;

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

/// A tokenizer's files: a tokenizer.json, or the files a "slow" tokenizer is made of, which
/// [`TokenizerFiles::load`] converts as transformers does.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizerFiles {
    pub kind: TokenizerKind,
    /// `tokenizer_config.json` (the class, renamed special tokens, `add_prefix_space`, `extra_ids`).
    pub config: Option<PathBuf>,
    pub special_tokens_map: Option<PathBuf>,
    /// The model's `config.json`, whose `model_type` decides the class when no config names one.
    pub model_config: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerKind {
    Json(PathBuf),
    /// Byte-level BPE (RoBERTa, BART, CodeT5).
    Bpe {
        vocab: PathBuf,
        merges: PathBuf,
        added_tokens: Option<PathBuf>,
    },
    /// A SentencePiece model (T5, UL2, mT5).
    SentencePiece(PathBuf),
    /// mBART's / PLBART's `sentencepiece.bpe.model`: recognised, refused when loaded.
    SentencePieceBpe(PathBuf),
}

/// The files of each kind, in the order a folder is searched.
pub const TOKENIZER_JSON: &str = "tokenizer.json";
const VOCAB_JSON: &str = "vocab.json";
const MERGES: &str = "merges.txt";
const ADDED_TOKENS: &str = "added_tokens.json";
const SPIECE: &str = "spiece.model";
const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
const SPECIAL_TOKENS_MAP: &str = "special_tokens_map.json";
/// mBART's, PLBART's and XLM-R's SentencePiece BPE: recognised, to be refused by name.
const SPM_BPE: &str = "sentencepiece.bpe.model";

impl TokenizerFiles {
    pub fn json(path: PathBuf) -> TokenizerFiles {
        TokenizerFiles {
            kind: TokenizerKind::Json(path),
            config: None,
            special_tokens_map: None,
            model_config: None,
        }
    }

    /// The tokenizer of a model folder: tokenizer.json, else vocab.json + merges.txt, else
    /// spiece.model. `None` when it has none of them.
    pub fn in_folder(dir: &Path) -> Result<Option<TokenizerFiles>> {
        let file = |n: &str| Some(dir.join(n)).filter(|p| p.is_file());
        let kind = if let Some(j) = file(TOKENIZER_JSON) {
            TokenizerKind::Json(j)
        } else if let (Some(vocab), Some(merges)) = (file(VOCAB_JSON), file(MERGES)) {
            TokenizerKind::Bpe {
                vocab,
                merges,
                added_tokens: file(ADDED_TOKENS),
            }
        } else if let Some(m) = file(SPIECE) {
            TokenizerKind::SentencePiece(m)
        } else if let Some(m) = file(SPM_BPE) {
            TokenizerKind::SentencePieceBpe(m)
        } else {
            return Ok(None);
        };
        Ok(Some(TokenizerFiles {
            kind,
            config: file(TOKENIZER_CONFIG),
            special_tokens_map: file(SPECIAL_TOKENS_MAP),
            model_config: file("config.json"),
        }))
    }

    /// The tokenizer of a Hub model, fetched into the cache: the same search as [`Self::in_folder`].
    pub async fn from_hub(repo: &RepoId, rev: &str, hub: &Hub) -> Result<Option<TokenizerFiles>> {
        let fetch = |n: &'static str| hub.fetch_optional(repo, rev, n);
        let kind = if let Some(j) = fetch(TOKENIZER_JSON).await? {
            TokenizerKind::Json(j)
        } else if let Some(vocab) = fetch(VOCAB_JSON).await? {
            let merges = fetch(MERGES).await?.ok_or_else(|| {
                Error::Tokenizer(format!("{}: vocab.json without merges.txt", repo.id))
            })?;
            TokenizerKind::Bpe {
                vocab,
                merges,
                added_tokens: fetch(ADDED_TOKENS).await?,
            }
        } else if let Some(m) = fetch(SPIECE).await? {
            TokenizerKind::SentencePiece(m)
        } else if let Some(m) = fetch(SPM_BPE).await? {
            TokenizerKind::SentencePieceBpe(m)
        } else {
            return Ok(None);
        };
        Ok(Some(TokenizerFiles {
            kind,
            config: fetch(TOKENIZER_CONFIG).await?,
            special_tokens_map: fetch(SPECIAL_TOKENS_MAP).await?,
            model_config: fetch("config.json").await?,
        }))
    }

    /// Every file, for copying the tokenizer beside a merged model: (path, name in a model folder).
    pub fn files(&self) -> Vec<(&Path, &'static str)> {
        let mut out: Vec<(&Path, &'static str)> = match &self.kind {
            TokenizerKind::Json(p) => vec![(p, TOKENIZER_JSON)],
            TokenizerKind::Bpe {
                vocab,
                merges,
                added_tokens,
            } => {
                let mut v: Vec<(&Path, &'static str)> = vec![(vocab, VOCAB_JSON), (merges, MERGES)];
                if let Some(a) = added_tokens {
                    v.push((a, ADDED_TOKENS));
                }
                v
            }
            TokenizerKind::SentencePiece(p) => vec![(p, SPIECE)],
            TokenizerKind::SentencePieceBpe(p) => vec![(p, SPM_BPE)],
        };
        if let Some(c) = &self.config {
            out.push((c, TOKENIZER_CONFIG));
        }
        if let Some(m) = &self.special_tokens_map {
            out.push((m, SPECIAL_TOKENS_MAP));
        }
        out
    }

    /// The tokenizer, converted from the slow files as transformers converts them.
    pub fn load(&self) -> Result<Tokenizer> {
        let (json, origin) = match &self.kind {
            TokenizerKind::Json(p) => return load(p),
            TokenizerKind::Bpe {
                vocab,
                merges,
                added_tokens,
            } => {
                self.require_class(
                    &["RobertaTokenizer", "BartTokenizer"],
                    &["bart", "t5", "roberta"],
                    vocab,
                )?;
                let cfg = self.settings()?;
                (
                    bpe::roberta_tokenizer_json(vocab, merges, added_tokens.as_deref(), &cfg)?,
                    vocab,
                )
            }
            TokenizerKind::SentencePiece(p) => {
                self.require_class(&["T5Tokenizer"], &["t5", "mt5", "umt5"], p)?;
                let bytes = std::fs::read(p).map_err(|e| Error::io(p.display(), e))?;
                let model = sentencepiece::SpModel::parse(&bytes, &p.display().to_string())?;
                let extra = self
                    .settings()?
                    .get("extra_ids")
                    .and_then(Value::as_u64)
                    .unwrap_or(100);
                (
                    model.t5_tokenizer_json(extra as usize, &p.display().to_string())?,
                    p,
                )
            }
            TokenizerKind::SentencePieceBpe(p) => {
                return Err(spm_bpe_refused(&p.display().to_string()))
            }
        };
        let text = serde_json::to_string(&json).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Tokenizer::from_str(&text).map_err(|e| {
            Error::Tokenizer(format!(
                "{}: converting the tokenizer: {e}",
                origin.display()
            ))
        })
    }

    /// tokenizer_config.json with special_tokens_map.json over it.
    fn settings(&self) -> Result<Value> {
        let mut out = serde_json::Map::new();
        for p in [&self.config, &self.special_tokens_map]
            .into_iter()
            .flatten()
        {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p.display(), e))?;
            match serde_json::from_str::<Value>(&text) {
                Ok(Value::Object(m)) => out.extend(m),
                _ => {
                    return Err(Error::Tokenizer(format!(
                        "{}: not a JSON object",
                        p.display()
                    )))
                }
            }
        }
        Ok(Value::Object(out))
    }

    /// The files convert only for the classes this knows: the folder's `tokenizer_class`, else its
    /// model's `model_type`, must be one of them (`…Fast` names the same class).
    fn require_class(&self, classes: &[&str], model_types: &[&str], file: &Path) -> Result<()> {
        let named = self
            .settings()?
            .get("tokenizer_class")
            .and_then(Value::as_str)
            .map(str::to_string);
        if let Some(c) = named {
            if classes.contains(&c.trim_end_matches("Fast")) {
                return Ok(());
            }
            return Err(Error::Tokenizer(format!(
                "{}: a `{c}` tokenizer, which conala cannot convert from these files (it converts {} from them); add a tokenizer.json (transformers' `tokenizer.save_pretrained` writes one)",
                file.display(),
                classes.join(", ")
            )));
        }
        let model_type = match &self.model_config {
            Some(p) => std::fs::read_to_string(p)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .and_then(|v| {
                    v.get("model_type")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                }),
            None => None,
        };
        match model_type {
            Some(t) if !model_types.contains(&t.as_str()) => Err(Error::Tokenizer(format!(
                "{}: the tokenizer of a `{t}` model, which conala cannot convert from these files (it converts {} from them); add a tokenizer.json",
                file.display(),
                classes.join(", ")
            ))),
            _ => Ok(()),
        }
    }
}

fn spm_bpe_refused(origin: &str) -> Error {
    Error::Tokenizer(format!(
        "{origin}: mBART's / PLBART's SentencePiece BPE ({SPM_BPE}), whose conversion conala does not implement; add a tokenizer.json (transformers' `tokenizer.save_pretrained` writes one)"
    ))
}

/// Where a tokenizer comes from: a tokenizer.json file, a model folder holding a tokenizer (see
/// [`TokenizerFiles::in_folder`]), or a Hub model id.
pub async fn resolve_tokenizer(
    spec: &str,
    revision: Option<&str>,
    hub: &Hub,
) -> Result<TokenizerFiles> {
    let p = Path::new(spec);
    if p.is_file() {
        return Ok(TokenizerFiles::json(p.to_path_buf()));
    }
    if p.is_dir() {
        return TokenizerFiles::in_folder(p)?.ok_or_else(|| {
            Error::Tokenizer(format!(
                "{spec}: the folder has no tokenizer (tokenizer.json, vocab.json + merges.txt, or spiece.model)"
            ))
        });
    }
    if looks_like_repo_id(spec) && !spec.ends_with(".json") {
        let repo = RepoId::model(spec);
        return TokenizerFiles::from_hub(&repo, revision.unwrap_or("main"), hub)
            .await?
            .ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{spec}: the Hub model has no tokenizer (tokenizer.json, vocab.json + merges.txt, or spiece.model)"
                ))
            });
    }
    Err(Error::Tokenizer(format!(
        "{spec}: no such tokenizer.json file, folder, or Hub model id"
    )))
}

/// A tokenizer.json. Checked as JSON first: the `tokenizers` crate panics on some malformed files.
pub fn load(path: &Path) -> Result<Tokenizer> {
    let bad = |e: String| {
        Error::Tokenizer(format!(
            "{}: not a usable tokenizer.json: {e}",
            path.display()
        ))
    };
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path.display(), e))?;
    serde_json::from_str::<Value>(&text).map_err(|e| bad(e.to_string()))?;
    match std::panic::catch_unwind(|| Tokenizer::from_str(&text)) {
        Ok(t) => t.map_err(|e| bad(e.to_string())),
        Err(_) => Err(bad("the tokenizers library could not read it".into())),
    }
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
