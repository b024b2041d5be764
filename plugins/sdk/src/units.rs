//! Sizes (`64KiB`, `10MiB`, `1GiB`, plain bytes) and durations (`30s`,
//! `5m`, `250ms`) as operators write them. Pure functions, used by
//! [`Options`](crate::Options).

use std::time::Duration;

/// A size in bytes: a whole number, optionally followed (spaces allowed)
/// by a unit: `B`; `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024, also `K`,
/// `M`, `G`, `T`); `KB`, `MB`, `GB`, `TB` (powers of 1000). Units ignore
/// case. `None` if malformed or over `u64::MAX`.
pub fn parse_size(text: &str) -> Option<u64> {
    let (number, unit) = split_number(text)?;
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

/// A duration: a whole number followed (spaces allowed) by a unit, `ms`,
/// `s`, `m`, `h` or `d`; several may follow each other (`1h30m`). A bare
/// number is refused: its unit would be a guess. `None` if malformed.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let number: u64 = rest[..digits].parse().ok()?;
        rest = rest[digits..].trim_start();
        let letters = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let part = match &rest[..letters] {
            "ms" => Duration::from_millis(number),
            "s" => Duration::from_secs(number),
            "m" => Duration::from_secs(number.checked_mul(60)?),
            "h" => Duration::from_secs(number.checked_mul(3600)?),
            "d" => Duration::from_secs(number.checked_mul(86_400)?),
            _ => return None,
        };
        total = total.checked_add(part)?;
        rest = rest[letters..].trim_start();
    }
    Some(total)
}

/// Leading digits and the rest (trimmed): `("64", "KiB")`.
fn split_number(text: &str) -> Option<(u64, &str)> {
    let text = text.trim();
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let number = text[..digits].parse().ok()?;
    Some((number, text[digits..].trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("65536"), Some(65536));
        assert_eq!(parse_size(" 64KiB "), Some(64 << 10));
        assert_eq!(parse_size("64 KiB"), Some(64 << 10));
        assert_eq!(parse_size("10MiB"), Some(10 << 20));
        assert_eq!(parse_size("10mib"), Some(10 << 20));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("2TiB"), Some(2 << 40));
        assert_eq!(parse_size("5MB"), Some(5_000_000));
        assert_eq!(parse_size("12B"), Some(12));
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("KiB"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("1.5GiB"), None);
        assert_eq!(parse_size("10 apples"), None);
        assert_eq!(parse_size("99999999999TiB"), None);
        assert_eq!(parse_size("18446744073709551616"), None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration(" 2 h "), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(
            parse_duration("1m 500ms"),
            Some(Duration::from_millis(60_500))
        );
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_duration("30"), None);
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("1.5s"), None);
        assert_eq!(parse_duration("5 minutes"), None);
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("99999999999999999999s"), None);
    }
}
