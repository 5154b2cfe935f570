//! The Debian package metadata (`[package.metadata.deb]`, built by `cargo deb`) names files that
//! exist, installs what docs/operations.md promises, and its maintainer script creates the user
//! the unit runs as. Building the package itself needs cargo-deb and a release build; the
//! operations guide records that it was built and installed.

use std::path::Path;

fn deb_metadata() -> toml::Table {
    let manifest: toml::Table =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
            .unwrap()
            .parse()
            .unwrap();
    manifest["package"]["metadata"]["deb"]
        .as_table()
        .unwrap()
        .clone()
}

#[test]
fn every_asset_of_the_package_exists_and_lands_where_documented() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let deb = deb_metadata();
    let mut destinations = Vec::new();
    for asset in deb["assets"].as_array().unwrap() {
        let asset = asset.as_array().unwrap();
        let (source, dest) = (asset[0].as_str().unwrap(), asset[1].as_str().unwrap());
        destinations.push(dest.to_string());
        if source.starts_with("target/") {
            continue; // built by cargo deb
        }
        let matched = match source.split_once('*') {
            None => root.join(source).is_file(),
            Some((dir, suffix)) => std::fs::read_dir(root.join(dir))
                .unwrap()
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().ends_with(suffix)),
        };
        assert!(matched, "package asset {source} matches no file");
    }
    for promised in [
        "usr/bin/",
        "etc/wechat-outbox/config.toml",
        "usr/share/wechat-outbox/migrations/sqlite/",
        "usr/share/wechat-outbox/migrations/postgres/",
    ] {
        assert!(
            destinations.iter().any(|d| d == promised),
            "{promised} not installed"
        );
    }
    let units = deb["systemd-units"].as_table().unwrap();
    let unit = root
        .join(units["unit-scripts"].as_str().unwrap())
        .join(format!("{}.service", units["unit-name"].as_str().unwrap()));
    assert!(unit.is_file(), "{} missing", unit.display());
    // Not started on install: the config needs an appid and a secret first.
    assert_eq!(units["start"].as_bool(), Some(false));
}

#[test]
fn the_maintainer_script_creates_the_user_the_unit_runs_as() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let scripts = root.join(deb_metadata()["maintainer-scripts"].as_str().unwrap());
    let postinst = std::fs::read_to_string(scripts.join("postinst")).unwrap();
    let unit = std::fs::read_to_string(root.join("deploy/wechat-outbox.service")).unwrap();
    assert!(unit.contains("User=wechat-outbox") && unit.contains("Group=wechat-outbox"));
    assert!(postinst.contains("adduser --system --ingroup wechat-outbox"));
    assert!(
        postinst.contains("#DEBHELPER#"),
        "cargo-deb inserts the unit handling there"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(scripts.join("postinst"))
            .unwrap()
            .permissions(),
    );
    assert!(mode & 0o111 != 0, "postinst must be executable");
}
