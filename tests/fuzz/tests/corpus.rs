//! Replays every seed of `fuzz/corpus/<target>/` through its target, so
//! that the targets build on stable and the seeds pass in every CI run.
//! The long runs are `fuzz/run` (cargo fuzz, nightly).

use std::path::Path;

#[test]
fn every_target_has_seeds_and_every_seed_passes() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    for (name, body) in airlock_fuzz::TARGETS {
        let dir = corpus.join(name);
        let seeds: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        assert!(!seeds.is_empty(), "no seeds for {name}");
        for seed in seeds {
            body(&std::fs::read(&seed).unwrap());
        }
    }
}

#[test]
fn the_cargo_fuzz_targets_match_the_library() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/fuzz_targets");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            e.unwrap()
                .path()
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    files.sort();
    let mut names: Vec<String> = airlock_fuzz::TARGETS
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    names.sort();
    assert_eq!(files, names);
}
