#!/usr/bin/env bash
# Build the example collectors written in other languages into
# target/examples/ (or $1): python_collector.wasm (componentize-py) and
# js_collector.wasm (componentize-js). `.ci/setup` installs both tools;
# a missing tool is an error, never a skip.
#
#   plugins/examples/build.sh [OUT_DIR] [python|js ...]
#
# After each build it prints the component's imports (with `jco wit`) and
# fails if the component imports `wasi:http`, which the daemon gives to
# uploaders only: such a collector would not load.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$root/target/examples}"
shift || true
langs=("$@")
[ "${#langs[@]}" -gt 0 ] || langs=(python js)
mkdir -p "$out"
out="$(cd "$out" && pwd)"

jsbin="$here/js-collector/node_modules/.bin"
need_js_tools() {
    if [ ! -x "$jsbin/componentize-js" ] || [ ! -x "$jsbin/jco" ]; then
        echo "build.sh: componentize-js and jco are not installed in $here/js-collector/node_modules:" >&2
        echo "  run .ci/setup (or: cd plugins/examples/js-collector && npm ci)" >&2
        exit 1
    fi
}

# Print the imports of a component and refuse one that imports wasi:http.
check_imports() {
    local wasm="$1" wit
    need_js_tools
    wit="$("$jsbin/jco" wit "$wasm")"
    echo "$(basename "$wasm"): $(stat -c %s "$wasm") bytes; imports:"
    grep '^  import ' <<<"$wit" | sed 's/^  import /  /; s/;$//'
    if grep -q '^  import wasi:http/' <<<"$wit"; then
        echo "build.sh: $wasm imports wasi:http, which collectors are not given" >&2
        exit 1
    fi
}

for lang in "${langs[@]}"; do
    case "$lang" in
    python)
        pin="$(cut -d= -f3 "$here/python-collector/requirements.txt")"
        have="$(componentize-py --version 2>/dev/null || true)"
        if [ "$have" != "componentize-py $pin" ]; then
            echo "build.sh: componentize-py $pin is needed, found ${have:-none}: run .ci/setup" >&2
            exit 1
        fi
        (cd "$here/python-collector" &&
            componentize-py --wit-path "$root/wit" --world collector \
                componentize app -o "$out/python_collector.wasm.tmp")
        mv "$out/python_collector.wasm.tmp" "$out/python_collector.wasm"
        check_imports "$out/python_collector.wasm"
        ;;
    js)
        need_js_tools
        # componentize-js's own CLI: `jco componentize` (which wraps it)
        # fails in jco 1.35.0 to read a WIT directory (see README.md).
        (cd "$root" &&
            "$jsbin/componentize-js" plugins/examples/js-collector/collector.js \
                --wit wit --world-name collector --disable http fetch-event \
                -o "$out/js_collector.wasm.tmp")
        mv "$out/js_collector.wasm.tmp" "$out/js_collector.wasm"
        check_imports "$out/js_collector.wasm"
        ;;
    *)
        echo "build.sh: unknown language $lang (python or js)" >&2
        exit 2
        ;;
    esac
done
