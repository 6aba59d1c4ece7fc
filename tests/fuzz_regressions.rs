//! Replays every input under `fuzz/regressions/<target>/` through its fuzz target's body: the inputs
//! that once crashed a parser (and a few hand-picked hostile ones) stay fixed. The fuzzers themselves
//! run on demand only (`scripts/fuzz.sh`).

use std::path::Path;

use harbor_router::fuzz_targets::TARGETS;

#[test]
fn every_regression_input_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut replayed = 0;
    for (name, target) in TARGETS {
        let dir = root.join(name);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            eprintln!("{name}: {}", path.display());
            target(&data);
            replayed += 1;
        }
    }
    assert!(replayed >= TARGETS.len(), "every target has inputs");
}
