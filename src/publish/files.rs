//! The files of a push: where each goes in the repository, where its bytes come from (a file on
//! disk, streamed, or a card made in memory), and the hashes the Hub's protocol asks for (sha256 for
//! LFS, the git blob id that preupload compares for small files).

use std::io::Read as _;
use std::path::{Path, PathBuf};

use sha1::Digest as _;
use sha2::Sha256;

use crate::error::{Error, Result};

/// Bytes of a file the Hub looks at to decide between a plain git blob and LFS.
const SAMPLE: usize = 512;

/// Where a file's bytes are.
#[derive(Debug, Clone)]
pub enum Source {
    /// Read (and streamed on upload) from disk, never whole in memory.
    Disk(PathBuf),
    /// Made by conala (a card); small.
    Bytes(Vec<u8>),
}

/// One file to put in the repository.
#[derive(Debug, Clone)]
pub struct UploadFile {
    /// Its path in the repository (`/`-separated).
    pub path_in_repo: String,
    pub source: Source,
    pub size: u64,
    /// Lower-case hex sha256 of the content: the LFS object id.
    pub sha256: String,
    /// The first bytes (preupload's `sample`).
    pub sample: Vec<u8>,
}

impl UploadFile {
    /// A file on disk, hashed in one streaming pass.
    pub fn from_disk(path_in_repo: impl Into<String>, path: &Path) -> Result<UploadFile> {
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path.display(), e))?;
        let mut hasher = Sha256::new();
        let mut sample = Vec::with_capacity(SAMPLE);
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(|e| Error::io(path.display(), e))?;
            if n == 0 {
                break;
            }
            if sample.len() < SAMPLE {
                let take = (SAMPLE - sample.len()).min(n);
                sample.extend_from_slice(&buf[..take]);
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        Ok(UploadFile {
            path_in_repo: path_in_repo.into(),
            source: Source::Disk(path.to_path_buf()),
            size,
            sha256: format!("{:x}", hasher.finalize()),
            sample,
        })
    }

    /// Bytes made in memory (a card).
    pub fn from_bytes(path_in_repo: impl Into<String>, bytes: Vec<u8>) -> UploadFile {
        UploadFile {
            path_in_repo: path_in_repo.into(),
            size: bytes.len() as u64,
            sha256: format!("{:x}", Sha256::digest(&bytes)),
            sample: bytes[..bytes.len().min(SAMPLE)].to_vec(),
            source: Source::Bytes(bytes),
        }
    }

    /// Where the bytes come from, for messages.
    pub fn origin(&self) -> String {
        match &self.source {
            Source::Disk(p) => p.display().to_string(),
            Source::Bytes(_) => format!("{} (made by conala)", self.path_in_repo),
        }
    }

    /// The whole content; only for files the Hub takes inline (small ones).
    pub fn read_all(&self) -> Result<Vec<u8>> {
        match &self.source {
            Source::Disk(p) => std::fs::read(p).map_err(|e| Error::io(p.display(), e)),
            Source::Bytes(b) => Ok(b.clone()),
        }
    }

    /// The git blob id (`sha1("blob {len}\0" + content)`): what preupload answers for a file stored
    /// as a plain git blob.
    pub fn git_blob_id(&self) -> Result<String> {
        let content = self.read_all()?;
        let mut h = sha1::Sha1::new();
        h.update(format!("blob {}\0", content.len()).as_bytes());
        h.update(&content);
        Ok(format!("{:x}", h.finalize()))
    }
}

/// Every file under `dir` (recursively, sorted), with its `/`-separated path relative to `dir`.
/// Hidden files and folders (`.git`, `.cache`) are left out.
pub fn walk(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    fn visit(dir: &Path, rel: &str, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
        let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir.display(), e))?;
        for entry in rd {
            let entry = entry.map_err(|e| Error::io(dir.display(), e))?;
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            let child = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if path.is_dir() {
                visit(&path, &child, out)?;
            } else {
                out.push((child, path));
            }
        }
        Ok(())
    }
    let mut out = vec![];
    visit(dir, "", &mut out)?;
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_match_git_and_sha256() {
        // `printf 'hello\n' | git hash-object --stdin` and `sha256sum`.
        let f = UploadFile::from_bytes("a.txt", b"hello\n".to_vec());
        assert_eq!(
            f.git_blob_id().unwrap(),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
        assert_eq!(
            f.sha256,
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.bin");
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &bytes).unwrap();
        let d = UploadFile::from_disk("big.bin", &p).unwrap();
        assert_eq!(d.size, bytes.len() as u64);
        assert_eq!(d.sha256, format!("{:x}", Sha256::digest(&bytes)));
        assert_eq!(d.sample, bytes[..512]);
    }

    #[test]
    fn walks_sorted_without_hidden_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sub")).unwrap();
        std::fs::create_dir_all(dir.path().join(".cache")).unwrap();
        std::fs::write(dir.path().join("b.json"), "{}").unwrap();
        std::fs::write(dir.path().join("sub/a.txt"), "x").unwrap();
        std::fs::write(dir.path().join(".cache/x"), "x").unwrap();
        let names: Vec<String> = walk(dir.path())
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, vec!["b.json", "sub/a.txt"]);
    }
}
