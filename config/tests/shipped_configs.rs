//! Every settings file shipped under `config/` must parse and validate.

#[test]
fn shipped_config_files_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml")
            && path.file_name().unwrap() != "Cargo.toml"
        {
            let text = std::fs::read_to_string(&path).unwrap();
            if let Err(e) = agora_config::settings::Settings::from_toml_str(&text) {
                panic!("{}: {e}", path.display());
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "expected the shipped example configs, found {checked}"
    );
}
