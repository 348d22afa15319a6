//! Times as the server reads and writes them: RFC 3339 in UTC.

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::OffsetDateTime;

/// Seconds since the Unix epoch, now.
pub(crate) fn unix_now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

/// `YYYY-MM-DDTHH:MM:SSZ` of now plus `offset_secs`.
pub(crate) fn now_rfc3339(offset_secs: i64) -> String {
    rfc3339(unix_now() + offset_secs)
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time (UTC): whole seconds, which query ranges and event
/// timestamps accept alike. A time out of the range of `time` (years ±9999) gives its number,
/// which the server refuses.
pub(crate) fn rfc3339(secs: i64) -> String {
    let format = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|at| at.format(format).ok())
        .unwrap_or_else(|| secs.to_string())
}

/// Microseconds since the Unix epoch of an RFC 3339 time, such as the server's
/// `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub(crate) fn parse_rfc3339_micros(text: &str) -> Option<i64> {
    let at = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    i64::try_from(at.unix_timestamp_nanos() / 1000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_is_whole_seconds_in_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_767_323_045), "2026-01-02T03:04:05Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(now_rfc3339(0).len(), "2026-01-02T03:04:05Z".len());
    }

    #[test]
    fn formatted_times_parse_back() {
        for secs in [0, 951_782_400, 1_767_323_045, unix_now()] {
            assert_eq!(parse_rfc3339_micros(&rfc3339(secs)), Some(secs * 1_000_000));
        }
    }

    #[test]
    fn the_servers_milliseconds_are_kept() {
        assert_eq!(
            parse_rfc3339_micros("2026-01-02T03:04:05.123Z"),
            Some(1_767_323_045_123_000)
        );
        assert_eq!(parse_rfc3339_micros("2026-01-02"), None);
    }
}
