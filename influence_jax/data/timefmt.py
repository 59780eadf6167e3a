"""Timestamps of a raw log in the format it was written in (`--time_format`): unix seconds or
milliseconds, ISO 8601, YYYYMMDD dates or a strptime pattern, read as int64 unix seconds with
pyarrow's vectorised kernels; values without their own offset are read in `--time_zone`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from influence_jax.data.schema import DataError

TIME_FORMATS = ("unix_s", "unix_ms", "iso8601", "yyyymmdd")
TIME_FORMAT_HELP = (
    "unix_s (integer seconds), unix_ms (integer milliseconds, floored to seconds), iso8601 "
    "(2023-01-05T10:20:30, a space for T, optional fraction and Z/+02:00 offset, or a bare "
    "date), yyyymmdd (20230105: midnight) or a strptime pattern with %, e.g. '%d/%m/%Y %H:%M'"
)
_ISO_RE = (
    r"^\s*(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})"
    r"(?:[T ](?P<h>[0-9]{2}):(?P<m>[0-9]{2})(?::(?P<s>[0-9]{2})(?:[.,][0-9]+)?)?)?"
    r"\s*(?P<zone>Z|[+-][0-9]{2}(?::?[0-9]{2})?)?\s*$"
)
_DAY_RE = r"^\s*[0-9]{8}\s*$"
# Unix seconds that read as YYYYMMDD dates (1900-01-01 .. 2100-12-31) all fall in August 1970.
_DATE_LO, _DATE_HI = 19000101, 21001231


def check(time_format: str, time_zone: str) -> None:
    """Raises a `DataError` naming the flag unless both are usable."""
    if time_format not in TIME_FORMATS and "%" not in time_format:
        raise DataError(
            f"--time_format: unknown format {time_format!r}; use one of {TIME_FORMAT_HELP}"
        )
    try:
        pc.assume_timezone(pa.array([0], pa.timestamp("s")), time_zone)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DataError(
            f"--time_zone: unknown time zone {time_zone!r}; use an IANA name like "
            "Asia/Shanghai or a fixed offset like +08:00"
        ) from None


def describe(time_format: str) -> str:
    """What a bad value of this format was expected to look like, for error messages."""
    if time_format == "unix_s":
        return "non-integer timestamp"
    return f"timestamp not in format {time_format}"


def parse(arr: pa.Array, time_format: str, time_zone: str) -> tuple[np.ndarray, np.ndarray]:
    """Strings, ints or dates in a format other than unix_s/unix_ms (logio.parse_time reads
    those and timestamp columns) -> (int64 unix seconds, valid mask)."""
    if pa.types.is_date(arr.type):
        ok = np.asarray(arr.is_valid())
        return _in_zone(np.asarray(pc.cast(arr, pa.timestamp("s")).fill_null(0)), time_zone), ok
    text = pc.utf8_trim_whitespace(arr.cast(pa.string()))
    if time_format == "yyyymmdd":
        return _yyyymmdd(text, time_zone)
    if time_format == "iso8601":
        return _iso(text, time_zone)
    return _strptime(text, time_format, time_zone)


def looks_like_dates(secs: np.ndarray) -> bool:
    """Whether every value (of at least one) reads as a YYYYMMDD date rather than a unix time."""
    if not len(secs):
        return False
    month, day = secs // 100 % 100, secs % 100
    dates = (secs >= _DATE_LO) & (secs <= _DATE_HI) & (month >= 1) & (month <= 12)
    return bool((dates & (day >= 1) & (day <= 31)).all())


def _in_zone(naive: np.ndarray, time_zone: str) -> np.ndarray:
    """Wall-clock times in `time_zone` (as unix seconds of the same UTC wall clock) -> unix
    seconds. A time a DST change repeats takes its earlier instant; one it skips, the instant of
    the change."""
    if time_zone == "UTC":
        return naive
    ts = pa.array(naive, pa.int64()).cast(pa.timestamp("s"))
    ts = pc.assume_timezone(ts, time_zone, ambiguous="earliest", nonexistent="latest")
    return np.asarray(ts.cast(pa.int64()))


def _civil(
    year: np.ndarray,
    month: np.ndarray,
    day: np.ndarray,
    hms: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Calendar fields -> (seconds since 1970-01-01 00:00 of that wall clock, valid mask): the
    day must exist in its month (no 2023-02-31) and the time be 00:00:00..23:59:59. Days from
    the civil date as in H. Hinnant's `days_from_civil`."""
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    month_days = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])
    ok = (month >= 1) & (month <= 12) & (day >= 1)
    ok &= day <= month_days[np.clip(month, 0, 12)] + (leap & (month == 2))
    y = year - (month <= 2)
    era = y // 400
    yoe = y - era * 400
    doy = (153 * np.where(month > 2, month - 3, month + 9) + 2) // 5 + day - 1
    days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
    secs = days * 86400
    if hms is not None:
        h, m, s = hms
        ok &= (h < 24) & (m < 60) & (s < 60)
        secs += h * 3600 + m * 60 + s
    return secs, ok


def _ints(text: pa.Array) -> np.ndarray:
    """Digit strings (empty: 0) -> int64."""
    return np.asarray(pc.if_else(pc.equal(text, ""), "0", text).cast(pa.int64()))


def _yyyymmdd(text: pa.Array, time_zone: str) -> tuple[np.ndarray, np.ndarray]:
    shape_ok = np.asarray(pc.fill_null(pc.match_substring_regex(text, _DAY_RE), False))
    n = _ints(pc.if_else(pa.array(shape_ok), text, "19700101"))
    secs, ok = _civil(n // 10000, n // 100 % 100, n % 100)
    return _in_zone(secs, time_zone), ok & shape_ok


def _iso(text: pa.Array, time_zone: str) -> tuple[np.ndarray, np.ndarray]:
    """ISO 8601 date-times (a fraction of a second is dropped, which floors it), shifted by
    their own offset or read in `time_zone`."""
    parts = pc.extract_regex(text, _ISO_RE)  # null where the value does not match
    shape_ok = np.asarray(parts.is_valid())
    parts = pc.if_else(
        pa.array(shape_ok), parts, pc.extract_regex(pa.array(["1970-01-01"]), _ISO_RE)[0]
    )
    date = parts.field("date")
    hms = tuple(_ints(parts.field(k)) for k in ("h", "m", "s"))
    naive, ok = _civil(
        _ints(pc.utf8_slice_codeunits(date, 0, 4)),
        _ints(pc.utf8_slice_codeunits(date, 5, 7)),
        _ints(pc.utf8_slice_codeunits(date, 8, 10)),
        hms,
    )
    zone = parts.field("zone")
    digits = pc.replace_substring(pc.utf8_slice_codeunits(zone, 1), ":", "")
    offset = _ints(pc.utf8_slice_codeunits(digits, 0, 2)) * 3600
    offset += _ints(pc.utf8_slice_codeunits(digits, 2, 4)) * 60
    offset *= np.where(np.asarray(pc.starts_with(zone, "-")), -1, 1)
    has_zone = np.asarray(pc.not_equal(zone, ""))
    secs = naive - offset  # 10:00+02:00 is 08:00 UTC
    if not has_zone.all():
        secs = np.where(has_zone, secs, _in_zone(naive, time_zone))
    return secs, ok & shape_ok


def _strptime(text: pa.Array, fmt: str, time_zone: str) -> tuple[np.ndarray, np.ndarray]:
    """A strptime pattern (pyarrow's: a day past the month's end rolls over, as in C)."""
    try:
        ts = pc.strptime(text, format=fmt, unit="s", error_is_null=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(f"--time_format: cannot parse with pattern {fmt!r} ({e})") from None
    ok = np.asarray(ts.is_valid())
    secs = np.asarray(ts.fill_null(0).cast(pa.int64()))
    if ts.type.tz is not None:  # the pattern had %z: absolute already
        return secs, ok
    return _in_zone(secs, time_zone), ok
