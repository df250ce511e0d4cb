"""The log line format of `fdqr run` and its intake processes."""

from __future__ import annotations

import datetime as dt
import logging
import re

from engine.logsetup import _Formatter


def test_log_time_carries_utc_offset() -> None:
    formatter = _Formatter("%(asctime)s %(levelname)s [intake 1] %(name)s: %(message)s")
    record = logging.LogRecord("engine.hl7.mllp", logging.INFO, __file__, 1, "opened", (), None)
    record.created = dt.datetime(2026, 12, 5, 19, 24, 19, 123000, tzinfo=dt.UTC).timestamp()

    line = formatter.format(record)

    match = re.fullmatch(
        r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d) INFO \[intake 1\]"
        r" engine\.hl7\.mllp: opened",
        line,
    )
    assert match is not None, line
    logged_time = dt.datetime.fromisoformat(match.group(1))
    assert logged_time == dt.datetime(2026, 12, 5, 19, 24, 19, 123000, tzinfo=dt.UTC)
