//! The name `cbcollect_info` (and ns_server) give a node's zip:
//! `collectinfo-YYYY-MM-DDTHHMMSS-NODE.zip`, in UTC, with `:` in the node
//! name replaced by `-`.

use std::time::SystemTime;

/// The zip's file name for `node`, collected at `now`.
pub fn zip_name(node: &str, now: SystemTime) -> String {
    format!(
        "collectinfo-{}-{}.zip",
        utc_stamp(now),
        node.replace(':', "-")
    )
}

/// `YYYY-MM-DDTHHMMSS` in UTC.
pub fn utc_stamp(now: SystemTime) -> String {
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn names_like_cbcollect_info() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_624_724);
        assert_eq!(
            zip_name("ns_1@10.0.0.1:9000", t),
            "collectinfo-2026-11-25T163844-ns_1@10.0.0.1-9000.zip"
        );
    }
}
