//! Replays every committed fuzz input under plain `cargo test`: the seed corpora
//! (`corpus/TARGET/`, made from the real fixtures) and each crash or hang the fuzzer found
//! (`regressions/TARGET/`, kept after the fix). A panic in any reader fails the test, naming the
//! input.

use std::path::Path;

#[test]
fn every_seed_and_regression_input_is_read_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut failures = Vec::new();
    for (name, target) in unitune_fuzz::TARGETS {
        let mut seeds = 0;
        for folder in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(folder).join(name)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                if std::panic::catch_unwind(|| target(&data)).is_err() {
                    failures.push(path.display().to_string());
                }
                seeds += usize::from(folder == "corpus");
            }
        }
        assert!(seeds > 0, "no seed corpus for target {name}");
    }
    assert!(failures.is_empty(), "readers panicked on: {failures:#?}");
}
