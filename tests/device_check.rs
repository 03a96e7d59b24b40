//! The device run (`scripts/gpu-check.sh`, `conala bench gpu`) in its CPU mode, so it cannot rot
//! between the sessions that are lent a GPU: every step runs, and the JSON holds what the GPU run
//! reports.

mod common;

use common::*;

#[test]
fn device_script_runs_its_cpu_mode_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let status = std::process::Command::new("bash")
        .arg(repo_root().join("scripts/gpu-check.sh"))
        .arg("--cpu")
        .arg(binary())
        .arg(&out)
        .args(["--no-python", "--work-dir"])
        .arg(tmp.path().join("work"))
        .current_dir(repo_root())
        .status()
        .unwrap();
    assert!(status.success());
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("gpu.json")).unwrap()).unwrap();
    assert_eq!(r["machine"]["device"], "cpu");
    let parity = r["parity"].as_array().unwrap();
    assert_eq!(parity.len(), 3);
    for p in parity {
        // The "device" is the CPU here: exactly the CPU's answers.
        assert_eq!(p["max_logit_diff"], 0.0, "{p}");
        assert_eq!(p["greedy_identical"], true, "{p}");
        let (ours, hf) = (
            p["bf16_agreement"].as_u64().unwrap(),
            p["hf_bf16_agreement"].as_u64().unwrap(),
        );
        assert!(ours + p["rows"].as_u64().unwrap() / 5 >= hf, "{p}");
    }
    let generation = r["generation"].as_array().unwrap();
    assert_eq!(generation.len(), 2);
    for g in generation {
        let ours = &g["measurement"]["ours"];
        assert_eq!(ours["rows"], 64.0, "{g}");
        assert!(ours["tokens"].as_f64().unwrap() > 0.0, "{g}");
        assert!(g["conala_tokens_per_second"].as_f64().unwrap() > 0.0, "{g}");
    }
    // Exactly 32 new tokens per row.
    assert_eq!(generation[1]["measurement"]["ours"]["tokens"], 64.0 * 32.0);
    assert!(r["training"]["conala_samples_per_second"].as_f64().unwrap() > 0.0);
    assert!(r["memory_peak_mib"].as_u64().unwrap() > 0);
    assert!(r["mined_projection_minutes"].as_f64().unwrap() > 0.0);
}
