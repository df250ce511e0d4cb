"""fdqr: federated DICOM Query/Retrieve and prior-study prefetch engine."""

import contextlib
import signal

# `fdqr run` takes a second or so to import its modules and read its
# configuration. A SIGHUP (a reload, a log rotation) in that time would end it.
# A service manager counts death by SIGHUP as a clean exit and would not start
# it again. The files are read after the signal anyway. `fdqr run` installs its
# reload handler once it runs; intake processes ignore SIGHUP for good.
with contextlib.suppress(ValueError):  # imported first outside the main thread
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
