//! The host's native redaction against an independent implementation:
//! `tests/redact_reference.py` applies `cbcollect_info`'s own regular
//! expressions with Python's `re`. Thousands of generated inputs, built
//! from the pieces the rules care about, must come out byte-identical,
//! whatever the chunking.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rand::Rng;
use rand::SeedableRng;

use autocollect::redact::{Redactor, redact};

const PIECES: &[&str] = &[
    "<ud>",
    "</ud>",
    "<",
    "</",
    "u",
    "d",
    ">",
    "/",
    "x",
    "Zoë",
    "名",
    "\n",
    "\r",
    " ",
    "log-redaction-salt",
    "log-",
    "=",
    "ud>",
    "<u",
];

fn generated(seed: u64, count: usize) -> Vec<Vec<u8>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            let n = rng.random_range(0..40);
            (0..n)
                .flat_map(|_| PIECES[rng.random_range(0..PIECES.len())].bytes())
                .collect()
        })
        .collect()
}

fn reference(salt: &str, inputs: &[Vec<u8>]) -> Vec<Vec<u8>> {
    use std::io::Write;
    let request = serde_json::json!({
        "salt": salt,
        "inputs": inputs.iter().map(|i| B64.encode(i)).collect::<Vec<_>>(),
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/redact_reference.py");
    let mut child = std::process::Command::new("/usr/bin/python3")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 runs (.ci/setup installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the reference failed");
    let outputs: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    outputs.iter().map(|o| B64.decode(o).unwrap()).collect()
}

#[test]
fn native_redaction_matches_cbcollect_infos_regular_expressions() {
    let salt = "s4lt-é";
    let inputs = generated(9, 3000);
    let want = reference(salt, &inputs);
    for (input, want) in inputs.iter().zip(&want) {
        let got = redact(salt, input);
        assert_eq!(
            got,
            *want,
            "input {:?}\n  native    {:?}\n  reference {:?}",
            String::from_utf8_lossy(input),
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(want)
        );
        // The same bytes in 3-byte chunks.
        let mut r = Redactor::new(salt);
        let mut chunked = Vec::new();
        for chunk in input.chunks(3) {
            r.push(chunk, &mut chunked);
        }
        r.finish(&mut chunked);
        assert_eq!(
            chunked,
            *want,
            "chunked: {:?}",
            String::from_utf8_lossy(input)
        );
    }
}
