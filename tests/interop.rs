//! Interop with HF transformers and PEFT end to end, where Python has them (torch, transformers, peft,
//! pyarrow; skipped, saying so, where it does not): `scripts/check_hf_interop.py` makes a model with
//! `conala model init`, trains a LoRA adapter with `conala run` and merges it with `conala merge`,
//! and checks that transformers and PEFT load each and generate our tokens. For BART it also runs a
//! full fine-tuning first, whose merged checkpoint transformers loads.

mod common;

use std::process::Command;

use common::{binary, repo_root};

fn python_has_the_stack() -> bool {
    Command::new("python3")
        .args(["-c", "import torch, transformers, peft, pyarrow"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn transformers_and_peft_load_what_conala_writes() {
    if !python_has_the_stack() {
        println!("skipped: python3 lacks torch / transformers / peft / pyarrow");
        return;
    }
    for family in ["flan-t5", "bart"] {
        let work = tempfile::tempdir().unwrap();
        let out = Command::new("python3")
            .arg(repo_root().join("scripts/check_hf_interop.py"))
            .args(["--family", family, "--conala"])
            .arg(binary())
            .arg("--work")
            .arg(work.path())
            .current_dir(repo_root())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        println!("{family}:\n{stdout}");
        assert!(
            out.status.success() && stdout.contains("ALL OK"),
            "{family}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("the adapter changes") && !stdout.contains("the adapter changes 0/"),
            "{family}: the trained adapter must change the generations: {stdout}"
        );
    }
}
