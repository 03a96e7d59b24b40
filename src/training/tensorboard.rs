//! TensorBoard event files, written by hand: TFRecord framing (length, masked CRC-32C of the length,
//! the bytes, masked CRC-32C of the bytes) around `tensorflow.Event` protos holding scalar summaries.
//! Every metrics line becomes one event at its step (`train/loss`, `train/lr`, `eval/bleu`, ...), so
//! TensorBoard shows what `metrics.jsonl` holds and `wandb sync --sync-tensorboard` uploads it.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The folder next to `metrics.jsonl` that holds the event file.
pub const TENSORBOARD: &str = "tensorboard";

/// An event file being appended to.
pub struct EventWriter {
    path: PathBuf,
}

impl EventWriter {
    /// The folder's event file: the existing one, or a new one named as TensorFlow names them
    /// (`events.out.tfevents.SECONDS.HOST`), starting with the version record.
    pub fn open(dir: &Path) -> Result<EventWriter> {
        if let Some(p) = event_files(dir).into_iter().next() {
            return Ok(EventWriter { path: p });
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display(), e))?;
        let now = wall_time();
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
            .unwrap_or_else(|| "conala".into());
        let path = dir.join(format!("events.out.tfevents.{}.{host}", now as u64));
        let w = EventWriter { path };
        let mut ev = Vec::new();
        double_field(&mut ev, 1, now);
        bytes_field(&mut ev, 3, b"brain.Event:2");
        w.write_records(&[ev])?;
        Ok(w)
    }

    /// Scalars at `step`, one event.
    pub fn scalars(&self, step: u64, values: &[(String, f32)]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let mut summary = Vec::new();
        for (tag, v) in values {
            let mut value = Vec::new();
            bytes_field(&mut value, 1, tag.as_bytes());
            value.push(0x15); // field 2 (simple_value), fixed32
            value.extend_from_slice(&v.to_le_bytes());
            bytes_field(&mut summary, 1, &value);
        }
        let mut ev = Vec::new();
        double_field(&mut ev, 1, wall_time());
        ev.push(0x10); // field 2 (step), varint
        varint(&mut ev, step);
        bytes_field(&mut ev, 5, &summary);
        self.write_records(&[ev])
    }

    fn write_records(&self, records: &[Vec<u8>]) -> Result<()> {
        let mut out = Vec::new();
        for r in records {
            let len = (r.len() as u64).to_le_bytes();
            out.extend_from_slice(&len);
            out.extend_from_slice(&masked_crc(&len).to_le_bytes());
            out.extend_from_slice(r);
            out.extend_from_slice(&masked_crc(r).to_le_bytes());
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io(self.path.display(), e))?;
        f.write_all(&out)
            .map_err(|e| Error::io(self.path.display(), e))
    }
}

/// The event files in `dir`, sorted.
pub fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().contains("tfevents"))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The scalars of a metrics line: `eval_bleu` as `eval/bleu`, `loss` as `train/loss`; `step` is
/// the event's step, not a scalar.
pub fn line_scalars(line: &serde_json::Value) -> Vec<(String, f32)> {
    let Some(obj) = line.as_object() else {
        return vec![];
    };
    obj.iter()
        .filter(|(k, _)| k.as_str() != "step")
        .filter_map(|(k, v)| {
            let v = v.as_f64()?;
            let tag = match k.strip_prefix("eval_") {
                Some(rest) => format!("eval/{rest}"),
                None => format!("train/{k}"),
            };
            Some((tag, v as f32))
        })
        .collect()
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    out.push((field << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn double_field(out: &mut Vec<u8>, field: u8, v: f64) {
    out.push((field << 3) | 1);
    out.extend_from_slice(&v.to_le_bytes());
}

/// CRC-32C (Castagnoli), the checksum TFRecord uses.
fn crc32c(bytes: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in bytes {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c(bytes);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C check value (RFC 3720, iSCSI) of "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    /// Read records back with their framing checked: (payload) per record.
    fn read_records(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = vec![];
        let mut i = 0;
        while i < bytes.len() {
            let len_bytes = &bytes[i..i + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(bytes[i + 8..i + 12].try_into().unwrap());
            assert_eq!(crc, masked_crc(len_bytes), "length crc");
            let data = &bytes[i + 12..i + 12 + len];
            let dcrc = u32::from_le_bytes(bytes[i + 12 + len..i + 16 + len].try_into().unwrap());
            assert_eq!(dcrc, masked_crc(data), "data crc");
            out.push(data.to_vec());
            i += 16 + len;
        }
        out
    }

    #[test]
    fn writes_framed_events_with_scalars() {
        let dir = tempfile::tempdir().unwrap();
        let w = EventWriter::open(dir.path()).unwrap();
        let line = serde_json::json!({"step": 300, "loss": 1.5, "eval_bleu": 15.0});
        let scalars = line_scalars(&line);
        assert!(scalars.contains(&("train/loss".to_string(), 1.5)));
        assert!(scalars.contains(&("eval/bleu".to_string(), 15.0)));
        assert_eq!(scalars.len(), 2);
        w.scalars(300, &scalars).unwrap();
        // Reopening appends to the same file.
        EventWriter::open(dir.path())
            .unwrap()
            .scalars(301, &[("train/lr".into(), 0.5)])
            .unwrap();
        let files = event_files(dir.path());
        assert_eq!(files.len(), 1);
        let recs = read_records(&std::fs::read(&files[0]).unwrap());
        assert_eq!(recs.len(), 3);
        assert!(recs[0].windows(13).any(|w| w == b"brain.Event:2"));
        // step 300 as a varint after tag 0x10: 0xac 0x02.
        assert!(recs[1].windows(3).any(|w| w == [0x10, 0xac, 0x02]));
        assert!(recs[1].windows(10).any(|w| w == b"train/loss"));
        assert!(recs[1]
            .windows(5)
            .any(|w| w[0] == 0x15 && w[1..] == 1.5f32.to_le_bytes()));
    }
}
