//! Every `configs/search-*.toml` in the repository parses and validates.

use longmix_search::SearchConfig;

#[test]
fn shipped_search_configs_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("search-") && name.ends_with(".toml") {
            SearchConfig::read(&path).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            seen += 1;
        }
    }
    assert!(seen >= 2, "expected the shipped search configs in {}", dir.display());
}
