//! Every corpus file and every crash the fuzzers found, replayed through its
//! target's check as an ordinary test: a crash once found stays fixed.

use std::path::{Path, PathBuf};

fn files_of(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_file_and_found_crash_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, check) in agora_fuzz::TARGETS {
        let corpus = files_of(&root.join("corpus").join(name));
        assert!(!corpus.is_empty(), "{name} has no seed corpus");
        for file in corpus
            .iter()
            .chain(&files_of(&root.join("crashes").join(name)))
        {
            let data = std::fs::read(file).unwrap();
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(outcome.is_ok(), "{name} fails on {}", file.display());
        }
    }
}
