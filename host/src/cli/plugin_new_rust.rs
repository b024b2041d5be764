//! The Rust project `plugin new --lang rust` writes: the template
//! collector (or uploader) as its own crate, depending on a vendored copy
//! of the SDK (`plugins/sdk`, embedded here; its WIT, under
//! `vendor/autocollect-sdk/wit/`, is written by the caller).

/// The SDK crate's files, as `vendor/autocollect-sdk/...`.
const SDK: &[(&str, &str)] = &[
    (
        "Cargo.toml",
        include_str!("../../../plugins/sdk/Cargo.toml"),
    ),
    ("README.md", include_str!("../../../plugins/sdk/README.md")),
    (
        "src/lib.rs",
        include_str!("../../../plugins/sdk/src/lib.rs"),
    ),
    (
        "src/error.rs",
        include_str!("../../../plugins/sdk/src/error.rs"),
    ),
    (
        "src/log.rs",
        include_str!("../../../plugins/sdk/src/log.rs"),
    ),
    (
        "src/options.rs",
        include_str!("../../../plugins/sdk/src/options.rs"),
    ),
    (
        "src/progress.rs",
        include_str!("../../../plugins/sdk/src/progress.rs"),
    ),
    (
        "src/rfc3339.rs",
        include_str!("../../../plugins/sdk/src/rfc3339.rs"),
    ),
    (
        "src/task.rs",
        include_str!("../../../plugins/sdk/src/task.rs"),
    ),
    (
        "src/units.rs",
        include_str!("../../../plugins/sdk/src/units.rs"),
    ),
];

/// The SDK's dependencies at the versions this repository builds and
/// tests its own plugins with: `plugins/Cargo.lock` less its own crates
/// (a unit test keeps the two equal). A new project builds with these,
/// not with whatever was released since. To write it again after
/// `plugins/Cargo.lock` changes: make a project with `plugin new
/// plugin-name`, copy `plugins/Cargo.lock` into it, run `cargo fetch
/// --target wasm32-wasip2` there (cargo drops what the project does not
/// use) and save the result here without the `plugin-name` package.
const SDK_LOCK: &str = include_str!("plugin_new_rust.Cargo.lock");

const COLLECTOR: &str = include_str!("../../../plugins/template-collector/src/lib.rs");
const UPLOADER: &str = include_str!("../../../plugins/template-uploader/src/lib.rs");

/// Files relative to the project's root (the WIT aside).
pub fn files(name: &str, uploader: bool) -> Vec<(String, String)> {
    let krate = name.replace('-', "_");
    let wasm = format!("target/wasm32-wasip2/release/{krate}.wasm");
    let mut files: Vec<(String, String)> = SDK
        .iter()
        .map(|(rel, text)| (format!("vendor/autocollect-sdk/{rel}"), text.to_string()))
        .collect();
    let role = if uploader { "uploader" } else { "collector" };
    files.push((
        "Cargo.toml".into(),
        format!(
            "[package]\n\
             name = \"{name}\"\n\
             version = \"0.1.0\"\n\
             edition = \"2024\"\n\
             publish = false\n\n\
             # A WASI preview 2 component is built from a cdylib.\n\
             [lib]\n\
             crate-type = [\"cdylib\"]\n\n\
             [dependencies]\n\
             # The plugin contract's bindings, the export macro, typed options\n\
             # and helpers: the SDK, vendored by `autocollect plugin new`.\n\
             autocollect-sdk = {{ path = \"vendor/autocollect-sdk\" }}\n\n\
             [profile.release]\n\
             opt-level = \"s\"\n\
             lto = true\n\
             codegen-units = 1\n\
             strip = true\n\
             panic = \"abort\"\n\n\
             [workspace]\n"
        ),
    ));
    if let Some(lock) = cargo_lock(name) {
        files.push(("Cargo.lock".into(), lock));
    }
    files.push((
        "src/lib.rs".into(),
        if uploader { UPLOADER } else { COLLECTOR }.to_string(),
    ));
    files.push((
        "build.sh".into(),
        format!(
            "#!/usr/bin/env bash\n\
             # Build {wasm} (needs: rustup target add wasm32-wasip2).\n\
             set -euo pipefail\n\
             cd \"$(dirname \"$0\")\"\n\
             cargo build --release --target wasm32-wasip2\n\
             echo \"built $(pwd)/{wasm}\"\n"
        ),
    ));
    files.push((
        "README.md".into(),
        format!(
            "# {name}\n\n\
             An autocollect {role} in Rust, made by `autocollect plugin new {name}`.\n\
             `src/lib.rs` is a working {role} to change; `vendor/autocollect-sdk`\n\
             is the SDK (its guide: `vendor/autocollect-sdk/README.md`), and\n\
             `vendor/autocollect-sdk/wit` the contract it builds against.\n\n\
             ```sh\n\
             rustup target add wasm32-wasip2              # once\n\
             ./build.sh                                   # -> {wasm}\n\
             autocollect plugin run {wasm}{run_args}\n\
             autocollect plugin check {wasm}\n\
             ```\n",
            run_args = if uploader {
                " --artifact FILE --upload-url https://HOST/PATH"
            } else {
                ""
            }
        ),
    ));
    files
}

/// The project's `Cargo.lock`: [`SDK_LOCK`] with the project's own package
/// among the others in the order cargo writes them (by name), so that the
/// first build leaves the file as it is. `None` when the project's name is
/// one of its dependencies' (cargo would have to tell the two apart by
/// version): cargo then resolves the versions itself.
fn cargo_lock(name: &str) -> Option<String> {
    const SEPARATOR: &str = "\n[[package]]\n";
    let (head, packages) = SDK_LOCK.split_once(SEPARATOR)?;
    let mut packages: Vec<String> = packages.split(SEPARATOR).map(str::to_string).collect();
    fn name_of(package: &str) -> &str {
        package
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("name = \""))
            .and_then(|l| l.strip_suffix('"'))
            .unwrap_or_default()
    }
    if packages.iter().any(|p| name_of(p) == name) {
        return None;
    }
    packages.push(format!(
        "name = \"{name}\"\nversion = \"0.1.0\"\ndependencies = [\n \"autocollect-sdk\",\n]\n"
    ));
    packages.sort_by(|a, b| name_of(a).cmp(name_of(b)));
    Some(
        packages
            .iter()
            .fold(head.to_string(), |lock, package| lock + SEPARATOR + package),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A package as a lock pins it: version, source, checksum, and the
    /// names of its dependencies (a lock adds a dependency's version only
    /// where it holds two versions of it; each is pinned by its own entry).
    fn pinned(
        package: &toml::Value,
    ) -> (Option<&toml::Value>, Vec<Option<&toml::Value>>, Vec<&str>) {
        let dependencies = package
            .get("dependencies")
            .and_then(toml::Value::as_array)
            .map(|d| {
                d.iter()
                    .filter_map(|d| d.as_str()?.split(' ').next())
                    .collect()
            })
            .unwrap_or_default();
        let source = ["source", "checksum"].map(|k| package.get(k)).to_vec();
        (package.get("version"), source, dependencies)
    }

    /// A lock file's packages by name (none is there twice in these).
    fn packages(lock: &str) -> BTreeMap<String, toml::Value> {
        let lock: toml::Table = toml::from_str(lock).expect("a lock file");
        lock["package"]
            .as_array()
            .expect("packages")
            .iter()
            .map(|p| (p["name"].as_str().unwrap().to_string(), p.clone()))
            .collect()
    }

    #[test]
    fn a_new_project_pins_the_versions_the_repositorys_plugins_build_with() {
        let plugins = packages(include_str!("../../../plugins/Cargo.lock"));
        let sdk = packages(SDK_LOCK);
        assert!(sdk.contains_key("autocollect-sdk") && sdk.contains_key("wit-bindgen"));
        for (name, package) in &sdk {
            assert_eq!(
                Some(pinned(package)),
                plugins.get(name).map(pinned),
                "{name} in host/src/cli/plugin_new_rust.Cargo.lock is not as in \
                 plugins/Cargo.lock: write it again (see SDK_LOCK)"
            );
        }
    }

    #[test]
    fn the_projects_package_goes_where_cargo_puts_it() {
        for name in ["aaa", "my-collector", "zzz"] {
            let lock = cargo_lock(name).unwrap();
            let names: Vec<String> = packages(&lock).into_keys().collect();
            let in_file: Vec<&str> = lock
                .lines()
                .filter_map(|l| l.strip_prefix("name = \""))
                .map(|l| l.trim_end_matches('"'))
                .collect();
            assert_eq!(in_file, names, "sorted by name, as cargo writes it");
            let own = &packages(&lock)[name];
            assert_eq!(own["dependencies"][0].as_str(), Some("autocollect-sdk"));
            assert!(own.get("source").is_none(), "{own}");
        }
        assert_eq!(cargo_lock("wit-bindgen"), None);
    }
}
