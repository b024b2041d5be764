//! What a plugin file is and why this host cannot run it, in the
//! operator's words: one diagnosis for `autocollect plugin check` and for
//! the daemon's start-up (`[collector] plugin`, `[uploader] plugin`), so
//! neither shows wasmtime's linker text where a plain reason exists.
//!
//! Compatibility is wasmtime's: its linker matches an import or export
//! named `...@0.1.x` with the host's `...@0.1.y` for any x and y (one
//! semver track; for 0.x versions the minor is the breaking part, for
//! later ones the major), then checks every used function's type. So a
//! plugin built against an older 0.1.x always runs (the contract only
//! adds), and one built against a newer 0.1.x runs when it uses nothing
//! the newer contract added.

use wasmtime::Engine;
use wasmtime::component::Component;

use super::WIT_VERSION;

/// The WIT package of the contract.
pub const PACKAGE: &str = "autocollect:plugin";

/// Which role a plugin plays: the world it is loaded as, which decides
/// the capabilities linked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `exec`, `task`, `inputs`, `budget`, `archive` (confined by the run's
    /// policies), no HTTP.
    Collector,
    /// `wasi:http` (confined by the run's outbound policy), no `exec`.
    Uploader,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Collector => "collector",
            Role::Uploader => "uploader",
        }
    }

    /// The interface a component of this role exports.
    pub fn export(self) -> &'static str {
        match self {
            Role::Collector => "collect",
            Role::Uploader => "upload",
        }
    }

    /// The interfaces of [`PACKAGE`] the host links for this role (a unit
    /// test keeps them equal to the worlds in `wit/`).
    pub fn offered(self) -> &'static [&'static str] {
        match self {
            Role::Collector => &[
                "types", "log", "progress", "exec", "task", "inputs", "budget", "archive",
            ],
            Role::Uploader => &["types", "log", "progress"],
        }
    }

    /// "a collector", "an uploader".
    pub fn with_article(self) -> &'static str {
        match self {
            Role::Collector => "a collector",
            Role::Uploader => "an uploader",
        }
    }

    fn other(self) -> Role {
        match self {
            Role::Collector => Role::Uploader,
            Role::Uploader => Role::Collector,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "collector" => Ok(Role::Collector),
            "uploader" => Ok(Role::Uploader),
            _ => Err(format!("{s:?}: expected collector or uploader")),
        }
    }
}

const WASIP2: &str = "a plugin is a WebAssembly component built for wasm32-wasip2 \
    (cargo build --target wasm32-wasip2)";

/// Whether `bytes` are a component at all, before wasmtime compiles them:
/// the reason (a clause that follows the file's name) if not.
pub fn check_encoding(bytes: &[u8]) -> Result<(), String> {
    if bytes.is_empty() {
        return Err(format!("is empty: {WASIP2}"));
    }
    if !bytes.starts_with(b"\0asm") {
        return Err(format!(
            "is not WebAssembly (it does not start with \\0asm): {WASIP2}"
        ));
    }
    match bytes.get(4..8) {
        None => Err(format!("is a truncated WebAssembly file: {WASIP2}")),
        Some([1, 0, 0, 0]) => Err(
            "is a core WebAssembly module, not a component: build for wasm32-wasip2 \
             (cargo build --target wasm32-wasip2), or make a component of a \
             wasm32-wasip1 module with `wasm-tools component new --adapt`"
                .into(),
        ),
        Some([_, _, 1, 0]) => Ok(()),
        Some(v) => Err(format!(
            "is WebAssembly of an unknown kind (version bytes {v:02x?}): {WASIP2}"
        )),
    }
}

/// A compiled component's names, as the host sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// Top-level import names (`wasi:io/streams@0.2.6`,
    /// `autocollect:plugin/log@0.1.4`...), in the component's order.
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    /// The role its exports say it plays.
    pub role: Option<Role>,
    /// The highest [`PACKAGE`] version among its names.
    pub wit_version: Option<String>,
}

impl Inspection {
    pub fn of(engine: &Engine, component: &Component) -> Inspection {
        let ty = component.component_type();
        let imports: Vec<String> = ty.imports(engine).map(|(n, _)| n.to_string()).collect();
        let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
        let role = [Role::Collector, Role::Uploader]
            .into_iter()
            .find(|r| exports_role(&exports, *r));
        let wit_version = super::wit_version(imports.iter().chain(&exports).map(String::as_str));
        Inspection {
            imports,
            exports,
            role,
            wit_version,
        }
    }

    fn built(&self) -> &str {
        self.wit_version.as_deref().unwrap_or("an unknown version")
    }
}

/// Whether `names` hold `role`'s export (at any version).
fn exports_role(names: &[String], role: Role) -> bool {
    names
        .iter()
        .any(|e| ours(e).is_some_and(|(name, _)| name == role.export()))
}

/// `autocollect:plugin/NAME@VERSION` → (NAME, VERSION).
fn ours(name: &str) -> Option<(&str, Option<&str>)> {
    let rest = name.strip_prefix(PACKAGE)?.strip_prefix('/')?;
    Some(match rest.split_once('@') {
        Some((n, v)) => (n, Some(v)),
        None => (rest, None),
    })
}

/// A version's semver track, as wasmtime matches names: the major from
/// 1.0 on, the minor below it, the whole version for 0.0.x and
/// pre-releases (compatible with nothing else). None if not a version.
fn track(version: &str) -> Option<(u64, u64, u64, bool)> {
    let core = version.split('+').next()?;
    let (core, pre) = match core.split_once('-') {
        Some((c, _)) => (c, true),
        None => (core, false),
    };
    let parts: Vec<u64> = core
        .split('.')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let [major, minor, patch] = parts[..] else {
        return None;
    };
    Some(match (major, minor) {
        _ if pre => (major, minor, patch, true),
        (0, 0) => (0, 0, patch, false),
        (0, _) => (0, minor, 0, false),
        _ => (major, 0, 0, false),
    })
}

/// Whether wasmtime links a name at `version` with the host's.
pub fn compatible(version: &str) -> bool {
    version == WIT_VERSION || (track(version).is_some() && track(version) == track(WIT_VERSION))
}

/// The contract versions this host runs every plugin of, e.g. "0.1.0 to
/// 0.1.4" (see the module's doc for later ones on the same track).
pub fn supported_range() -> String {
    match track(WIT_VERSION) {
        Some((0, 0, _, _)) | Some((_, _, _, true)) | None => WIT_VERSION.to_string(),
        Some((0, minor, _, _)) => format!("0.{minor}.0 to {WIT_VERSION}"),
        Some((major, _, _, _)) => format!("{major}.0.0 to {WIT_VERSION}"),
    }
}

/// One line on what this host runs.
pub fn support_note() -> String {
    let range = supported_range();
    match track(WIT_VERSION) {
        Some((0, minor, _, false)) if minor > 0 => format!(
            "{PACKAGE} {WIT_VERSION}: runs plugins built against {range}, and against a later \
             0.{minor}.x when they use nothing added after {WIT_VERSION}"
        ),
        Some((major, _, _, false)) if major > 0 => format!(
            "{PACKAGE} {WIT_VERSION}: runs plugins built against {range}, and against a later \
             {major}.x when they use nothing added after {WIT_VERSION}"
        ),
        _ => format!("{PACKAGE} {WIT_VERSION}: runs plugins built against {range}"),
    }
}

/// Why this host cannot run `inspection` as `role`, from its names alone
/// (before linking): the first reason found.
pub fn diagnose(inspection: &Inspection, role: Role) -> Result<(), String> {
    let wanted = format!(
        "[{role}] needs a component exporting {PACKAGE}/{}",
        role.export()
    );
    match inspection.role {
        _ if exports_role(&inspection.exports, role) => {}
        Some(other) => return Err(format!("this is {}; {wanted}", other.with_article())),
        None => {
            let exports = match inspection.exports.is_empty() {
                true => "nothing".to_string(),
                false => inspection.exports.join(", "),
            };
            return Err(format!(
                "this is not an autocollect plugin (it exports {exports}); {wanted}"
            ));
        }
    }
    let names = inspection.imports.iter().chain(&inspection.exports);
    if let Some(version) = names.filter_map(|n| ours(n)?.1).find(|v| !compatible(v)) {
        let why = match track(version) {
            Some((0, _, _, false)) => "for 0.x versions the minor version is the breaking one",
            Some((_, _, _, true)) => "a pre-release matches only itself",
            _ => "a different major version",
        };
        return Err(format!(
            "built against {PACKAGE} {version}, which this daemon ({WIT_VERSION}) cannot run: \
             it runs plugins built against {} ({why})",
            supported_range()
        ));
    }
    for import in &inspection.imports {
        if let Some((name, _)) = ours(import) {
            if role.offered().contains(&name) {
                continue;
            }
            if role.other().offered().contains(&name) {
                return Err(format!(
                    "it uses {PACKAGE}/{name}, which only {}s are given; [{role}] does not \
                     offer it",
                    role.other()
                ));
            }
            return Err(format!(
                "built against {} and uses {PACKAGE}/{name}, which this daemon ({WIT_VERSION}) \
                 lacks",
                inspection.built()
            ));
        }
        if role == Role::Collector && import.starts_with("wasi:http/") {
            return Err(format!(
                "it uses {import}, which only uploaders are given: a collector makes no \
                 network requests"
            ));
        }
    }
    Ok(())
}

/// The reason for a link failure that [`diagnose`] did not foresee (a
/// function or type added to an interface the host has, an unknown WASI
/// import): the import wasmtime names, then its own words.
pub fn link_failure(inspection: &Inspection, error: &wasmtime::Error) -> String {
    // wasmtime: "component imports instance `NAME`, but a matching
    // implementation was not found in the linker", with the cause after.
    let top = error.to_string();
    let import = top
        .split('`')
        .nth(1)
        .filter(|n| inspection.imports.iter().any(|i| i == n));
    let cause = error
        .chain()
        .skip(1)
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ");
    let cause = match cause.is_empty() {
        true => top.clone(),
        false => cause,
    };
    match import {
        Some(name) if ours(name).is_some() => format!(
            "built against {} and uses {name} with something this daemon ({WIT_VERSION}) \
             lacks: {cause}",
            inspection.built()
        ),
        Some(name) => format!(
            "it imports {name}, which this daemon does not offer as the plugin needs it: {cause}"
        ),
        None => format!("it needs imports this daemon does not offer: {error:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::run::linker;
    use std::path::Path;

    /// A component for `world` in the WIT of `wit/` with every
    /// `@WIT_VERSION` replaced by `@version`, plus `extra` files: every
    /// function a trap, for linking, not running.
    fn component(version: &str, extra: &[(&str, &str)], world: &str) -> Vec<u8> {
        let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit");
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("deps")).unwrap();
        for entry in std::fs::read_dir(wit.join("deps")).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(
                entry.path(),
                dir.path().join("deps").join(entry.file_name()),
            )
            .unwrap();
        }
        for entry in std::fs::read_dir(&wit).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "wit") {
                let text = std::fs::read_to_string(&path).unwrap();
                let text = text.replace(
                    &format!("{PACKAGE}@{WIT_VERSION}"),
                    &format!("{PACKAGE}@{version}"),
                );
                std::fs::write(dir.path().join(path.file_name().unwrap()), text).unwrap();
            }
        }
        for (name, text) in extra {
            let text = text.replace(
                &format!("{PACKAGE}@{WIT_VERSION}"),
                &format!("{PACKAGE}@{version}"),
            );
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        encode(dir.path(), world)
    }

    fn encode(dir: &Path, world: &str) -> Vec<u8> {
        use wit_component::{ComponentEncoder, StringEncoding, dummy_module};
        let mut resolve = wit_parser::Resolve::default();
        let (pkg, _) = resolve.push_dir(dir).unwrap();
        let world = resolve.select_world(&[pkg], Some(world)).unwrap();
        let mut module = dummy_module(&resolve, world, wit_parser::ManglingAndAbi::Standard32);
        wit_component::embed_component_metadata(&mut module, &resolve, world, StringEncoding::UTF8)
            .unwrap();
        ComponentEncoder::default()
            .module(&module)
            .unwrap()
            .validate(true)
            .encode()
            .unwrap()
    }

    fn engine() -> Engine {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        Engine::new(&config).unwrap()
    }

    /// The diagnosis, then the real linker's verdict.
    fn check(bytes: &[u8], role: Role) -> Result<Inspection, String> {
        check_encoding(bytes)?;
        let engine = engine();
        let component = Component::new(&engine, bytes).map_err(|e| format!("{e:#}"))?;
        let inspection = Inspection::of(&engine, &component);
        diagnose(&inspection, role)?;
        linker(&engine, role)
            .unwrap()
            .instantiate_pre(&component)
            .map_err(|e| link_failure(&inspection, &e))?;
        Ok(inspection)
    }

    fn builtin(name: &str) -> &'static [u8] {
        crate::plugin::builtin::lookup(name).unwrap().1
    }

    #[test]
    fn bytes_that_are_not_a_component_say_what_they_are() {
        let core = check_encoding(b"\0asm\x01\0\0\0").unwrap_err();
        assert!(
            core.starts_with(
                "is a core WebAssembly module, not a component: build for wasm32-wasip2"
            ),
            "{core}"
        );
        assert!(check_encoding(b"").unwrap_err().starts_with("is empty: "));
        let random = check_encoding(b"\x7fELF\x02\x01\x01 and more").unwrap_err();
        assert!(random.starts_with("is not WebAssembly"), "{random}");
        assert!(
            check_encoding(b"\0asm\x0d")
                .unwrap_err()
                .contains("truncated")
        );
        assert!(check_encoding(b"\0asm\x0d\0\x01\0").is_ok());
        assert!(check_encoding(builtin("mock-collector")).is_ok());
    }

    #[test]
    fn the_builtins_run_in_their_own_role_only() {
        let collector = check(builtin("mock-collector"), Role::Collector).unwrap();
        assert_eq!(collector.role, Some(Role::Collector));
        assert_eq!(collector.wit_version.as_deref(), Some(WIT_VERSION));
        assert!(
            collector
                .imports
                .iter()
                .any(|i| i.starts_with("autocollect:plugin/log@"))
        );
        let uploader = check(builtin("http-uploader"), Role::Uploader).unwrap();
        assert_eq!(uploader.role, Some(Role::Uploader));

        assert_eq!(
            check(builtin("http-uploader"), Role::Collector).unwrap_err(),
            "this is an uploader; [collector] needs a component exporting autocollect:plugin/collect"
        );
        assert_eq!(
            check(builtin("mock-collector"), Role::Uploader).unwrap_err(),
            "this is a collector; [uploader] needs a component exporting autocollect:plugin/upload"
        );
    }

    #[test]
    fn the_roles_offer_what_the_worlds_in_wit_import() {
        let mut resolve = wit_parser::Resolve::default();
        let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit");
        let (pkg, _) = resolve.push_dir(&wit).unwrap();
        for role in [Role::Collector, Role::Uploader] {
            let world = resolve.select_world(&[pkg], Some(role.name())).unwrap();
            let mut imported: Vec<String> = resolve.worlds[world]
                .imports
                .keys()
                .map(|k| resolve.name_world_key(k))
                .filter_map(|n| ours(&n).map(|(name, _)| name.to_string()))
                .collect();
            imported.sort();
            let mut offered: Vec<String> = role.offered().iter().map(|s| s.to_string()).collect();
            offered.sort();
            assert_eq!(imported, offered, "{role}");
            // And the linker links the whole world.
            check(&component(WIT_VERSION, &[], role.name()), role).unwrap();
        }
    }

    #[test]
    fn a_plugin_built_against_0_1_0_runs() {
        // The collector world as it was in 0.1.0 (exports only `collect`,
        // imports only `log` and `progress`).
        let dir = tempfile::tempdir().unwrap();
        let types = include_str!("../../../wit/types.wit");
        // 0.1.0's types: the records and `log`/`progress`, not `task`.
        let old = format!(
            "package {PACKAGE}@0.1.0;\n{}",
            &types[types.find("interface types").unwrap()..]
        );
        std::fs::write(dir.path().join("types.wit"), old).unwrap();
        std::fs::write(
            dir.path().join("collector.wit"),
            format!(
                "package {PACKAGE}@0.1.0;\n\
                 interface collect {{\n\
                   use types.{{job-context, options, artifact, plugin-error}};\n\
                   record collect-request {{ context: job-context, options: options, output-dir: string }}\n\
                   record collect-outcome {{ artifacts: list<artifact>, summary: string }}\n\
                   validate-options: func(options: options) -> result<_, plugin-error>;\n\
                   collect: func(request: collect-request) -> result<collect-outcome, plugin-error>;\n\
                 }}\n\
                 world collector {{ import log; import progress; export collect; }}\n"
            ),
        )
        .unwrap();
        let bytes = encode(dir.path(), "collector");
        let inspection = check(&bytes, Role::Collector).unwrap();
        assert_eq!(inspection.wit_version.as_deref(), Some("0.1.0"));
    }

    #[test]
    fn a_later_minor_runs_while_it_uses_nothing_new() {
        let bytes = component("0.1.99", &[], "collector");
        let inspection = check(&bytes, Role::Collector).unwrap();
        assert_eq!(inspection.wit_version.as_deref(), Some("0.1.99"));
    }

    #[test]
    fn a_later_minor_with_a_new_interface_names_it() {
        let x = format!(
            "package {PACKAGE}@0.1.99;\ninterface x {{ hello: func(); }}\n\
             world collector-x {{ include collector; import x; }}\n"
        );
        let bytes = component("0.1.99", &[("x.wit", &x)], "collector-x");
        assert_eq!(
            check(&bytes, Role::Collector).unwrap_err(),
            format!(
                "built against 0.1.99 and uses autocollect:plugin/x, which this daemon \
                 ({WIT_VERSION}) lacks"
            )
        );
    }

    #[test]
    fn a_later_minor_with_a_new_function_names_its_interface() {
        // `log` gains a function in 0.1.99.
        let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit/types.wit");
        let types = std::fs::read_to_string(wit).unwrap().replace(
            "interface log {",
            "interface log {\n    log-twice: func(message: string);\n",
        );
        let bytes = component("0.1.99", &[("types.wit", &types)], "collector");
        let why = check(&bytes, Role::Collector).unwrap_err();
        assert!(
            why.starts_with(&format!(
                "built against 0.1.99 and uses autocollect:plugin/log@0.1.99 with something \
                 this daemon ({WIT_VERSION}) lacks: "
            )),
            "{why}"
        );
        assert!(why.contains("log-twice"), "{why}");
    }

    #[test]
    fn another_track_is_refused_with_the_range() {
        for version in ["0.2.0", "1.0.0"] {
            let bytes = component(version, &[], "collector");
            let why = check(&bytes, Role::Collector).unwrap_err();
            assert!(
                why.starts_with(&format!(
                    "built against autocollect:plugin {version}, which this daemon \
                     ({WIT_VERSION}) cannot run: it runs plugins built against {}",
                    supported_range()
                )),
                "{why}"
            );
        }
    }

    #[test]
    fn another_roles_capability_is_named() {
        // A collector that also imports wasi:http.
        let world = format!(
            "package {PACKAGE}@{WIT_VERSION};\n\
             world collector-http {{ include collector; import wasi:http/outgoing-handler@0.2.12; }}\n"
        );
        let bytes = component(WIT_VERSION, &[("w.wit", &world)], "collector-http");
        let why = check(&bytes, Role::Collector).unwrap_err();
        assert!(
            why.starts_with("it uses wasi:http/")
                && why.contains(", which only uploaders are given"),
            "{why}"
        );
        // An uploader that also imports exec.
        let world = format!(
            "package {PACKAGE}@{WIT_VERSION};\n\
             world uploader-exec {{ include uploader; import exec; }}\n"
        );
        let bytes = component(WIT_VERSION, &[("w.wit", &world)], "uploader-exec");
        assert_eq!(
            check(&bytes, Role::Uploader).unwrap_err(),
            "it uses autocollect:plugin/exec, which only collectors are given; [uploader] \
             does not offer it"
        );
    }

    #[test]
    fn a_component_of_no_role_says_what_it_exports() {
        let world = format!(
            "package {PACKAGE}@{WIT_VERSION};\n\
             world command {{ import log; export wasi:cli/run@0.2.12; }}\n"
        );
        let bytes = component(WIT_VERSION, &[("w.wit", &world)], "command");
        assert_eq!(
            check(&bytes, Role::Uploader).unwrap_err(),
            "this is not an autocollect plugin (it exports wasi:cli/run@0.2.12); [uploader] \
             needs a component exporting autocollect:plugin/upload"
        );
    }

    #[test]
    fn the_range_and_the_tracks() {
        assert!(compatible(WIT_VERSION));
        assert!(compatible("0.1.0") == WIT_VERSION.starts_with("0.1."));
        assert!(!compatible("0.2.0") || WIT_VERSION.starts_with("0.2."));
        assert!(!compatible("0.1.0-rc1"));
        assert!(!compatible("nonsense"));
        assert_eq!(track("1.2.3"), Some((1, 0, 0, false)));
        assert_eq!(track("0.0.3"), Some((0, 0, 3, false)));
        assert_eq!(track("0.3.7"), Some((0, 3, 0, false)));
        assert!(supported_range().ends_with(&format!(" to {WIT_VERSION}")));
        assert!(support_note().contains(&supported_range()));
    }
}
