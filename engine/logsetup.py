"""Log lines of `fdqr run` and its intake processes: time with its UTC offset, level, logger."""

from __future__ import annotations

import datetime as dt
import logging
import sys


class _Formatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # E.g. 2026-12-05 19:24:19.123+01:00: the offset matches lines to times shown elsewhere.
        local = dt.datetime.fromtimestamp(record.created).astimezone()
        return local.isoformat(sep=" ", timespec="milliseconds")


def setup_logging(level: str, prefix: str = "") -> None:
    """Log to standard error at level; prefix goes before each logger name."""
    from twisted.logger import STDLibLogObserver, globalLogBeginner

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    globalLogBeginner.beginLoggingTo([STDLibLogObserver()], redirectStandardIO=False)
