//! Case counts for the property tests: proptest's default (256, or `PROPTEST_CASES` when set)
//! for cheap properties, fewer for the expensive ones unless `PROPTEST_CASES` asks for more.

use proptest::test_runner::Config;

/// `default_cases` for this property, unless `PROPTEST_CASES` is set (the opt-in long run).
pub fn cases(default_cases: u32) -> Config {
    let config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_some() {
        config
    } else {
        Config {
            cases: default_cases,
            ..config
        }
    }
}
