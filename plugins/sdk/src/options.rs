//! Typed access to a plugin's options (`list<tuple<string, string>>`).

use std::fmt::Display;
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::Duration;

use crate::Error;
use crate::archive::Compression;
use crate::units::{parse_duration, parse_size};

/// The options of a run (the node's `[collector.options]` or
/// `[uploader.options]`), as key/value strings: the host turns TOML
/// numbers and booleans into text.
///
/// Every getter returns `Ok(None)` for an absent key, and the contract's
/// `invalid-option` error, naming the key, for a malformed value; a
/// `required_*` getter fails for an absent key too (`is required`).
/// Values are trimmed before they are parsed. Call
/// [`check_known`](Options::check_known) in `validate-options`.
///
/// ```
/// # use autocollect_sdk::Options;
/// let pairs = vec![("lines".to_string(), "10".to_string())];
/// let options = Options::new(&pairs);
/// options.check_known(&["greeting", "lines"])?;
/// assert_eq!(options.get("greeting").unwrap_or("hello"), "hello");
/// assert_eq!(options.integer_in("lines", 1..=1000)?.unwrap_or(3), 10u32);
/// # Ok::<(), autocollect_sdk::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Options<'a> {
    pairs: &'a [(String, String)],
}

impl<'a> Options<'a> {
    pub fn new(pairs: &'a [(String, String)]) -> Options<'a> {
        Options { pairs }
    }

    /// The pairs, in the order the host gave them.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The value of `key`, as given (the last one, should a key repeat).
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `key`, which must be given.
    pub fn required(&self, key: &str) -> Result<&'a str, Error> {
        self.get(key).ok_or_else(|| missing(key))
    }

    /// Fail on the first key (in the host's order) not in `known`:
    /// `unknown option (known: a, b, c)`.
    pub fn check_known(&self, known: &[&str]) -> Result<(), Error> {
        self.check_known_by(|key| known.contains(&key), &known.join(", "))
    }

    /// Fail on the first key for which `is_known` is false, listing
    /// `known` in the message: for keys with a variable part, e.g.
    /// `check_known_by(|k| k == "program" || k.starts_with("env."),
    /// "program, env.NAME")`.
    pub fn check_known_by(
        &self,
        is_known: impl Fn(&str) -> bool,
        known: &str,
    ) -> Result<(), Error> {
        match self.iter().find(|(key, _)| !is_known(key)) {
            Some((key, _)) => Err(Error::invalid_option(
                key,
                format!("unknown option (known: {known})"),
            )),
            None => Ok(()),
        }
    }

    /// The value of `key` parsed with [`FromStr`]; if that fails, `must
    /// be {what}, got "VALUE"`, e.g. `parse::<u32>("attempts", "a whole
    /// number of attempts")`.
    pub fn parse<T: FromStr>(&self, key: &str, what: &str) -> Result<Option<T>, Error> {
        self.map(key, |v| v.parse().ok(), || format!("must be {what}"))
    }

    /// An integer: `must be an integer, got "VALUE"`.
    pub fn integer<T: FromStr>(&self, key: &str) -> Result<Option<T>, Error> {
        self.parse(key, "an integer")
    }

    /// An integer in `range`: `must be an integer from 1 to 10, got
    /// "VALUE"`.
    pub fn integer_in<T: FromStr + PartialOrd + Display>(
        &self,
        key: &str,
        range: RangeInclusive<T>,
    ) -> Result<Option<T>, Error> {
        self.map(
            key,
            |v| v.parse().ok().filter(|n| range.contains(n)),
            || {
                format!(
                    "must be an integer from {} to {}",
                    range.start(),
                    range.end()
                )
            },
        )
    }

    /// `true` or `false` (also `yes`/`no`, `on`/`off`, `1`/`0`; any case):
    /// `must be true or false, got "VALUE"`.
    pub fn bool(&self, key: &str) -> Result<Option<bool>, Error> {
        self.map(
            key,
            |v| match v.to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "1" => Some(true),
                "false" | "no" | "off" | "0" => Some(false),
                _ => None,
            },
            || "must be true or false".to_string(),
        )
    }

    /// A duration such as `30s`, `5m`, `250ms`, `1h30m` (see
    /// [`parse_duration`]): `must be a duration such as 30s, 5m or 250ms,
    /// got "VALUE"`.
    pub fn duration(&self, key: &str) -> Result<Option<Duration>, Error> {
        self.map(key, parse_duration, || {
            "must be a duration such as 30s, 5m or 250ms".to_string()
        })
    }

    /// A size in bytes such as `65536`, `64KiB`, `10MiB`, `1GiB` (see
    /// [`parse_size`]): `must be a size such as 65536, 64KiB, 10MiB or
    /// 1GiB, got "VALUE"`.
    pub fn size(&self, key: &str) -> Result<Option<u64>, Error> {
        self.map(key, parse_size, || {
            "must be a size such as 65536, 64KiB, 10MiB or 1GiB".to_string()
        })
    }

    /// An archive compression: `stored`, `deflate` (level 6) or
    /// `deflate:1` to `deflate:9`: `must be stored or deflate:1 to
    /// deflate:9, got "VALUE"`.
    pub fn compression(&self, key: &str) -> Result<Option<Compression>, Error> {
        self.map(
            key,
            |v| match v {
                "stored" => Some(Compression::Stored),
                "deflate" => Some(Compression::Deflate(6)),
                _ => v
                    .strip_prefix("deflate:")
                    .and_then(|l| l.parse().ok())
                    .filter(|l| (1..=9).contains(l))
                    .map(Compression::Deflate),
            },
            || "must be stored or deflate:1 to deflate:9".to_string(),
        )
    }

    /// As [`integer`](Options::integer), and the key must be given.
    pub fn required_integer<T: FromStr>(&self, key: &str) -> Result<T, Error> {
        self.integer(key)?.ok_or_else(|| missing(key))
    }

    /// As [`integer_in`](Options::integer_in), and the key must be given.
    pub fn required_integer_in<T: FromStr + PartialOrd + Display>(
        &self,
        key: &str,
        range: RangeInclusive<T>,
    ) -> Result<T, Error> {
        self.integer_in(key, range)?.ok_or_else(|| missing(key))
    }

    /// As [`bool`](Options::bool), and the key must be given.
    pub fn required_bool(&self, key: &str) -> Result<bool, Error> {
        self.bool(key)?.ok_or_else(|| missing(key))
    }

    /// As [`duration`](Options::duration), and the key must be given.
    pub fn required_duration(&self, key: &str) -> Result<Duration, Error> {
        self.duration(key)?.ok_or_else(|| missing(key))
    }

    /// As [`size`](Options::size), and the key must be given.
    pub fn required_size(&self, key: &str) -> Result<u64, Error> {
        self.size(key)?.ok_or_else(|| missing(key))
    }

    /// The value of `key` through `parse` (given the trimmed value); if
    /// it gives `None`, `invalid-option` with `"{expected()}, got
    /// "VALUE""`.
    pub fn map<T>(
        &self,
        key: &str,
        parse: impl FnOnce(&str) -> Option<T>,
        expected: impl FnOnce() -> String,
    ) -> Result<Option<T>, Error> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        match parse(value.trim()) {
            Some(parsed) => Ok(Some(parsed)),
            None => Err(Error::invalid_option(
                key,
                format!("{}, got {value:?}", expected()),
            )),
        }
    }
}

fn missing(key: &str) -> Error {
    Error::invalid_option(key, "is required")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn invalid(key: &str, message: &str) -> Error {
        Error::invalid_option(key, message)
    }

    #[test]
    fn known_keys() {
        let p = pairs(&[("a", "1"), ("typo", "2"), ("later", "3")]);
        let o = Options::new(&p);
        assert_eq!(
            o.check_known(&["a", "b"]),
            Err(invalid("typo", "unknown option (known: a, b)"))
        );
        assert_eq!(o.check_known(&["a", "typo", "later"]), Ok(()));
        let p = pairs(&[("env.X", "1"), ("env.", "2")]);
        let o = Options::new(&p);
        assert_eq!(
            o.check_known_by(|k| k.starts_with("env.") && k.len() > 4, "env.NAME"),
            Err(invalid("env.", "unknown option (known: env.NAME)"))
        );
    }

    #[test]
    fn strings_and_integers() {
        let p = pairs(&[("s", "text"), ("n", " 42 "), ("neg", "-3"), ("bad", "4x")]);
        let o = Options::new(&p);
        assert_eq!(o.get("s"), Some("text"));
        assert_eq!(o.get("none"), None);
        assert_eq!(o.required("s"), Ok("text"));
        assert_eq!(o.required("none"), Err(invalid("none", "is required")));
        assert_eq!(o.integer::<u64>("n"), Ok(Some(42)));
        assert_eq!(o.integer::<i32>("neg"), Ok(Some(-3)));
        assert_eq!(
            o.integer::<u64>("neg"),
            Err(invalid("neg", "must be an integer, got \"-3\""))
        );
        assert_eq!(o.integer::<u64>("none"), Ok(None));
        assert_eq!(o.required_integer::<u64>("n"), Ok(42));
        assert_eq!(
            o.required_integer::<u64>("none"),
            Err(invalid("none", "is required"))
        );
        assert_eq!(o.integer_in("n", 1..=100u32), Ok(Some(42)));
        assert_eq!(
            o.integer_in("n", 1..=10u32),
            Err(invalid(
                "n",
                "must be an integer from 1 to 10, got \" 42 \""
            ))
        );
        assert_eq!(
            o.integer_in("bad", 1..=10u32),
            Err(invalid(
                "bad",
                "must be an integer from 1 to 10, got \"4x\""
            ))
        );
        assert_eq!(
            o.parse::<u32>("bad", "a whole number of attempts"),
            Err(invalid(
                "bad",
                "must be a whole number of attempts, got \"4x\""
            ))
        );
    }

    #[test]
    fn booleans() {
        let p = pairs(&[("t", "true"), ("f", "False"), ("y", "yes"), ("x", "maybe")]);
        let o = Options::new(&p);
        assert_eq!(o.bool("t"), Ok(Some(true)));
        assert_eq!(o.bool("f"), Ok(Some(false)));
        assert_eq!(o.bool("y"), Ok(Some(true)));
        assert_eq!(o.bool("none"), Ok(None));
        assert_eq!(
            o.bool("x"),
            Err(invalid("x", "must be true or false, got \"maybe\""))
        );
        assert_eq!(o.required_bool("none"), Err(invalid("none", "is required")));
    }

    #[test]
    fn durations_and_sizes() {
        let p = pairs(&[("d", "5m"), ("bare", "30"), ("z", "10MiB"), ("zz", "ten")]);
        let o = Options::new(&p);
        assert_eq!(o.duration("d"), Ok(Some(Duration::from_secs(300))));
        assert_eq!(
            o.duration("bare"),
            Err(invalid(
                "bare",
                "must be a duration such as 30s, 5m or 250ms, got \"30\""
            ))
        );
        assert_eq!(o.required_duration("d"), Ok(Duration::from_secs(300)));
        assert_eq!(o.size("z"), Ok(Some(10 << 20)));
        assert_eq!(o.size("bare"), Ok(Some(30)));
        assert_eq!(
            o.size("zz"),
            Err(invalid(
                "zz",
                "must be a size such as 65536, 64KiB, 10MiB or 1GiB, got \"ten\""
            ))
        );
        assert_eq!(o.required_size("none"), Err(invalid("none", "is required")));
    }

    #[test]
    fn compressions() {
        let p = pairs(&[
            ("a", "stored"),
            ("b", "deflate"),
            ("c", " deflate:9 "),
            ("d", "deflate:0"),
            ("e", "zstd"),
        ]);
        let o = Options::new(&p);
        assert_eq!(o.compression("a"), Ok(Some(Compression::Stored)));
        assert_eq!(o.compression("b"), Ok(Some(Compression::Deflate(6))));
        assert_eq!(o.compression("c"), Ok(Some(Compression::Deflate(9))));
        let bad = |k: &str, v: &str| {
            Err(invalid(
                k,
                &format!("must be stored or deflate:1 to deflate:9, got {v:?}"),
            ))
        };
        assert_eq!(o.compression("d"), bad("d", "deflate:0"));
        assert_eq!(o.compression("e"), bad("e", "zstd"));
    }
}
