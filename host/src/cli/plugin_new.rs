//! `autocollect plugin new NAME`: a plugin project, outside this
//! repository, that builds with one command (`./build.sh`) and runs with
//! `autocollect plugin run`. Everything it needs comes from this binary:
//! the WIT contract, and for Rust the SDK crate (vendored), for Python and
//! JavaScript the example collector's sources and pinned tools.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The contract, as this daemon speaks it.
const WIT: &[(&str, &str)] = &[
    ("types.wit", include_str!("../../../wit/types.wit")),
    ("collector.wit", include_str!("../../../wit/collector.wit")),
    ("uploader.wit", include_str!("../../../wit/uploader.wit")),
    ("exec.wit", include_str!("../../../wit/exec.wit")),
    ("inputs.wit", include_str!("../../../wit/inputs.wit")),
    ("archive.wit", include_str!("../../../wit/archive.wit")),
    ("budget.wit", include_str!("../../../wit/budget.wit")),
    ("deps/cli.wit", include_str!("../../../wit/deps/cli.wit")),
    (
        "deps/clocks.wit",
        include_str!("../../../wit/deps/clocks.wit"),
    ),
    (
        "deps/filesystem.wit",
        include_str!("../../../wit/deps/filesystem.wit"),
    ),
    ("deps/http.wit", include_str!("../../../wit/deps/http.wit")),
    ("deps/io.wit", include_str!("../../../wit/deps/io.wit")),
    (
        "deps/random.wit",
        include_str!("../../../wit/deps/random.wit"),
    ),
    (
        "deps/sockets.wit",
        include_str!("../../../wit/deps/sockets.wit"),
    ),
];

const PYTHON_APP: &str = include_str!("../../../plugins/examples/python-collector/app.py");
const PYTHON_REQUIREMENTS: &str =
    include_str!("../../../plugins/examples/python-collector/requirements.txt");
const JS_COLLECTOR: &str = include_str!("../../../plugins/examples/js-collector/collector.js");
const JS_PACKAGE: &str = include_str!("../../../plugins/examples/js-collector/package.json");
const JS_LOCK: &str = include_str!("../../../plugins/examples/js-collector/package-lock.json");
const JS_NPMRC: &str = include_str!("../../../plugins/examples/js-collector/.npmrc");

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    Js,
}

/// Make `NAME/` in `dir`; its path.
pub fn scaffold(name: &str, dir: &Path, lang: Lang, uploader: bool) -> Result<PathBuf> {
    check_name(name)?;
    let root = dir.join(name);
    if root.exists() {
        bail!("{} already exists", root.display());
    }
    if uploader && lang != Lang::Rust {
        bail!(
            "an uploader in {} is not offered yet (it needs wasi:http's streaming body, which \
             the example tools do not wrap): use --lang rust",
            if lang == Lang::Python {
                "Python"
            } else {
                "JavaScript"
            }
        );
    }
    let files = match lang {
        Lang::Python => python(name),
        Lang::Js => js(name),
        Lang::Rust => super::plugin_new_rust::files(name, uploader),
    };
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let write = |rel: &str, text: &str| -> Result<()> {
        let path = root.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    // The contract: beside the sources, or, for Rust, in the vendored SDK
    // that generates the bindings from it.
    let wit_dir = match lang {
        Lang::Rust => "vendor/autocollect-sdk/wit",
        Lang::Python | Lang::Js => "wit",
    };
    for (rel, text) in WIT {
        write(&format!("{wit_dir}/{rel}"), text)?;
    }
    for (rel, text) in &files {
        write(rel, text)?;
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        root.join("build.sh"),
        std::fs::Permissions::from_mode(0o755),
    )?;
    Ok(root)
}

/// A name usable as a directory, a crate and a file name.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok {
        bail!(
            "{name:?}: a plugin name is 1 to 64 lowercase letters, digits and '-', starting \
             with a letter"
        );
    }
    Ok(())
}

fn python(name: &str) -> Vec<(String, String)> {
    let wasm = format!("{}.wasm", name.replace('-', "_"));
    let build = format!(
        "#!/usr/bin/env bash\n\
         # Build {wasm} (needs componentize-py, as pinned in requirements.txt:\n\
         #   python3 -m pip install -r requirements.txt).\n\
         set -euo pipefail\n\
         cd \"$(dirname \"$0\")\"\n\
         componentize-py --wit-path wit --world collector componentize app -o {wasm}\n"
    );
    let readme = format!(
        "# {name}\n\n\
         An autocollect collector in Python (componentize-py), made by\n\
         `autocollect plugin new {name} --lang python`. `app.py` is a working\n\
         collector to change; `wit/` is the contract it builds against.\n\n\
         ```sh\n\
         python3 -m pip install -r requirements.txt   # once\n\
         ./build.sh                                   # -> {wasm}\n\
         autocollect plugin run {wasm}                # one local collection\n\
         autocollect plugin check {wasm}              # what the daemon sees\n\
         ```\n"
    );
    vec![
        ("app.py".into(), PYTHON_APP.into()),
        ("requirements.txt".into(), PYTHON_REQUIREMENTS.into()),
        ("build.sh".into(), build),
        ("README.md".into(), readme),
    ]
}

fn js(name: &str) -> Vec<(String, String)> {
    let wasm = format!("{}.wasm", name.replace('-', "_"));
    let package = JS_PACKAGE.replace("\"autocollect-js-collector\"", &format!("\"{name}\""));
    let package = replace_scripts(&package, &wasm);
    let lock = JS_LOCK.replace("\"autocollect-js-collector\"", &format!("\"{name}\""));
    let build = format!(
        "#!/usr/bin/env bash\n\
         # Build {wasm} with the pinned componentize-js (npm ci installs it).\n\
         set -euo pipefail\n\
         cd \"$(dirname \"$0\")\"\n\
         [ -x node_modules/.bin/componentize-js ] || npm ci --no-audit --no-fund\n\
         node_modules/.bin/componentize-js collector.js --wit wit --world-name collector \\\n\
         \x20   --disable http fetch-event -o {wasm}\n"
    );
    let readme = format!(
        "# {name}\n\n\
         An autocollect collector in JavaScript (componentize-js), made by\n\
         `autocollect plugin new {name} --lang js`. `collector.js` is a working\n\
         collector to change; `wit/` is the contract it builds against. It is\n\
         built without `wasi:http` (`--disable http fetch-event`): collectors\n\
         have no network.\n\n\
         ```sh\n\
         ./build.sh                                   # -> {wasm} (runs npm ci once)\n\
         autocollect plugin run {wasm}                # one local collection\n\
         autocollect plugin check {wasm}              # what the daemon sees\n\
         ```\n"
    );
    vec![
        ("collector.js".into(), JS_COLLECTOR.into()),
        ("package.json".into(), package),
        ("package-lock.json".into(), lock),
        (".npmrc".into(), JS_NPMRC.into()),
        ("build.sh".into(), build),
        ("README.md".into(), readme),
    ]
}

/// The example's `scripts` point into this repository: the new project's
/// build from its own directory.
fn replace_scripts(package: &str, wasm: &str) -> String {
    let mut value: serde_json::Value = match serde_json::from_str(package) {
        Ok(v) => v,
        Err(_) => return package.to_string(),
    };
    value["scripts"] = serde_json::json!({
        "build": "./build.sh",
        "wit": format!("jco wit {wasm}"),
    });
    serde_json::to_string_pretty(&value).unwrap_or_else(|_| package.to_string()) + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_projects_never_overwrite() {
        for bad in ["", "Caps", "9lives", "a/b", "a b", "../x", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let root = scaffold("my-plugin", dir.path(), Lang::Python, false).unwrap();
        assert!(root.join("wit/deps/io.wit").exists());
        assert!(root.join("app.py").exists());
        let again = scaffold("my-plugin", dir.path(), Lang::Python, false).unwrap_err();
        assert!(again.to_string().contains("already exists"));
        let js = scaffold("js-one", dir.path(), Lang::Js, false).unwrap();
        let package = std::fs::read_to_string(js.join("package.json")).unwrap();
        assert!(package.contains("\"name\": \"js-one\""), "{package}");
        assert!(
            scaffold("up", dir.path(), Lang::Js, true)
                .unwrap_err()
                .to_string()
                .contains("--lang rust")
        );
    }
}
