//! Plugins compiled from `plugins/` by the build script and embedded in the
//! binary, so a fresh install needs no extra files.

/// Built-in plugins by name (`builtin:NAME` in the config).
const BUILTINS: &[(&str, &[u8])] = &[
    (
        "cbcollect",
        include_bytes!(concat!(env!("AUTOCOLLECT_PLUGIN_DIR"), "/cbcollect.wasm")),
    ),
    (
        "files",
        include_bytes!(concat!(
            env!("AUTOCOLLECT_PLUGIN_DIR"),
            "/files_collector.wasm"
        )),
    ),
    (
        "http-uploader",
        include_bytes!(concat!(
            env!("AUTOCOLLECT_PLUGIN_DIR"),
            "/http_uploader.wasm"
        )),
    ),
    (
        "mock-collector",
        include_bytes!(concat!(
            env!("AUTOCOLLECT_PLUGIN_DIR"),
            "/mock_collector.wasm"
        )),
    ),
];

pub fn lookup(name: &str) -> Option<(&'static str, &'static [u8])> {
    BUILTINS.iter().copied().find(|(n, _)| *n == name)
}

pub fn names() -> Vec<&'static str> {
    BUILTINS.iter().map(|(n, _)| *n).collect()
}

/// Path of a plugin built from `plugins/` but not embedded (test plugins),
/// e.g. `test_misbehave`. Only meaningful on the machine that built us.
pub fn build_output(file_stem: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("AUTOCOLLECT_PLUGIN_DIR")).join(format!("{file_stem}.wasm"))
}

/// The target directory the build script built `plugins/` in (where
/// `build_output`'s files were copied from), with the dependencies of
/// every plugin compiled. Only meaningful on the machine that built us.
pub fn plugins_target_dir() -> &'static std::path::Path {
    std::path::Path::new(env!("AUTOCOLLECT_PLUGIN_TARGET_DIR"))
}
