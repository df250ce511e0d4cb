"""DCMTK's findscu, movescu, getscu and storescp as the clients and destination of tests."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from engine.testing.orthanc import dcmtk_environment
from engine.testing.ports import free_port, wait_for_port

TOOL_TIMEOUT_SECONDS = 180


@dataclasses.dataclass(frozen=True)
class Response:
    """One DIMSE response as DCMTK's debug output prints it."""

    status: int
    fields: dict[str, str]
    error_comment: str

    def count(self, name: str) -> int | None:
        value = self.fields.get(f"{name} Suboperations", "none")
        return None if value == "none" else int(value)


@dataclasses.dataclass(frozen=True)
class Run:
    output: str
    responses: list[Response]
    elapsed_seconds: float

    @property
    def final(self) -> Response:
        return self.responses[-1]

    @property
    def pending(self) -> list[Response]:
        return [response for response in self.responses if response.status in (0xFF00, 0xFF01)]


_BLOCK = re.compile(
    r"=+ INCOMING DIMSE MESSAGE =+\n(.*?)=+ END DIMSE MESSAGE =+\n(.*?)(?==+ INCOMING DIMSE|\Z)",
    re.S,
)
_COMMENT = re.compile(r"\(0000,0902\) LO \[(.*?)\]")


def parse_responses(output: str) -> list[Response]:
    text = re.sub(r"^[DIWE]: ?", "", output, flags=re.M)
    responses = []
    for block, after in _BLOCK.findall(text):
        fields = {}
        for line in block.splitlines():
            name, _, value = line.partition(":")
            fields[name.strip()] = value.strip()
        if "RSP" not in fields.get("Message Type", ""):
            continue
        status = int(fields["DIMSE Status"].split(":")[0], 16)
        detail = after.split("===")[0]
        comment = _COMMENT.search(detail)
        responses.append(Response(status, fields, comment.group(1) if comment else ""))
    return responses


def run_tool(arguments: list[str], cwd: Path | None = None) -> Run:
    import time

    started = time.monotonic()
    completed = subprocess.run(
        arguments,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_SECONDS,
        env=dcmtk_environment(),
        cwd=cwd,
        check=False,
    )
    output = completed.stdout + completed.stderr
    return Run(output, parse_responses(output), time.monotonic() - started)


def keys(pairs: dict[str, str | None]) -> list[str]:
    arguments = []
    for name, value in pairs.items():
        arguments += ["-k", f"{name}={value}" if value is not None else name]
    return arguments


def findscu(
    port: int,
    calling: str,
    level: str,
    pairs: dict[str, str | None],
    folder: Path,
    root: str = "-S",
    extra: list[str] | None = None,
) -> tuple[Run, list[Dataset]]:
    """Run a C-FIND; return the run and the identifiers received, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("rsp*.dcm"):
        old.unlink()
    run = run_tool(
        ["findscu", "-d", root, "-X", "-od", str(folder), "-aet", calling, "-aec", "FDQR"]
        + (extra or [])
        + ["127.0.0.1", str(port)]
        + keys({"QueryRetrieveLevel": level, **pairs})
    )
    return run, [dcmread(path) for path in sorted(folder.glob("rsp*.dcm"))]


def movescu(
    port: int,
    calling: str,
    destination: str,
    pairs: dict[str, str | None],
    root: str = "-S",
    extra: list[str] | None = None,
) -> Run:
    return run_tool(
        ["movescu", "-d", root, "-aet", calling, "-aec", "FDQR", "-aem", destination]
        + (extra or [])
        + ["127.0.0.1", str(port)]
        + keys(pairs)
    )


def getscu(
    port: int, calling: str, pairs: dict[str, str | None], folder: Path, root: str = "-S"
) -> Run:
    folder.mkdir(parents=True, exist_ok=True)
    arguments = ["getscu", "-d", root, "-aet", calling, "-aec", "FDQR", "-od", str(folder)]
    return run_tool([*arguments, "127.0.0.1", str(port), *keys(pairs)])


class StoreSCP:
    """DCMTK's storescp: a move destination that writes every object it receives to a folder."""

    def __init__(self, ae_title: str, folder: Path) -> None:
        self.ae_title = ae_title
        self.folder = folder
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            ["storescp", "-aet", self.ae_title, "-od", str(self.folder), str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env=dcmtk_environment(),
        )
        wait_for_port("127.0.0.1", self.port)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=15)
            self._process = None

    def received(self) -> list[Dataset]:
        return [dcmread(path) for path in sorted(self.folder.iterdir()) if path.is_file()]

    def clear(self) -> None:
        for path in self.folder.iterdir():
            path.unlink()
