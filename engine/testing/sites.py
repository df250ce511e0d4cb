"""A test network on loopback: Orthanc sites, an engine configuration, an engine process."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from engine.jobs.store import JobRecord, Store
from engine.testing.dicomgen import build_study, encode
from engine.testing.orthanc import OrthancServer
from engine.testing.ports import free_port, wait_for_port
from engine.testing.scenario import Scenario

ENGINE_AE_TITLE = "FDQR"
# Node names and AE titles as in conf/engine.yaml.
SITE_AE_TITLES = {"hospital_a": "HOSP_A", "hospital_b": "HOSP_B", "local_pacs": "LOCAL_PACS"}
REPOSITORY = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class EnginePorts:
    dicom: int = dataclasses.field(default_factory=free_port)
    mllp: int = dataclasses.field(default_factory=free_port)
    web: int = dataclasses.field(default_factory=free_port)


def shipped_settings(template: Path | None = None) -> dict[str, Any]:
    """Read conf/engine.yaml with the files it names made absolute, to write elsewhere."""
    template = template or REPOSITORY / "conf" / "engine.yaml"
    settings: dict[str, Any] = yaml.safe_load(template.read_text())
    conf = template.parent.resolve()
    settings["identity"]["table"] = str(conf / settings["identity"]["table"])
    for key in ("routes", "rules", "anatomy"):
        if settings.get(key):
            settings[key] = str((conf / settings[key]).resolve())
    return settings


class Network:
    """Orthanc servers for every site, all knowing the engine's AE for C-MOVE."""

    def __init__(
        self,
        folder: Path,
        ports: EnginePorts | None = None,
        site_settings: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """site_settings adds Orthanc settings per site, e.g. a MaximumPduLength."""
        self.folder = folder
        self.ports = ports or EnginePorts()
        engine_node = {"fdqr": (ENGINE_AE_TITLE, "127.0.0.1", self.ports.dicom)}
        extra = site_settings or {}
        self.sites = {
            name: OrthancServer(
                name,
                ae_title,
                folder / name,
                modalities=engine_node,
                extra_settings=extra.get(name),
            )
            for name, ae_title in SITE_AE_TITLES.items()
        }

    def start(self) -> None:
        for server in self.sites.values():
            server.start()

    def stop(self) -> None:
        for server in self.sites.values():
            server.stop()

    def load(self, scenario: Scenario) -> int:
        """Store every study of the scenario at its site; return the number of instances."""
        count = 0
        for placement in scenario.placements:
            server = self.sites[placement.site]
            for ds in build_study(placement.patient, placement.study):
                server.upload(encode(ds))
                count += 1
        return count

    def write_engine_config(
        self,
        target: Path,
        template: Path | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> Path:
        """Write an engine configuration for this network, based on conf/engine.yaml."""
        settings = shipped_settings(template)
        settings["dicom"]["port"] = self.ports.dicom
        settings["mllp"]["listen"] = f"tcp:{self.ports.mllp}:interface=127.0.0.1"
        settings["web"]["listen"] = f"tcp:{self.ports.web}:interface=127.0.0.1"
        for name, server in self.sites.items():
            settings["nodes"][name]["host"] = server.host
            settings["nodes"][name]["port"] = server.dicom_port
        settings["store"]["path"] = str(target.parent / "fdqr.sqlite")
        settings["spool"]["path"] = str(target.parent / "spool")
        if settings.get("audit", {}).get("file"):
            settings["audit"]["file"] = str(target.parent / "audit.log")
        settings["jobs"]["poll_seconds"] = 0.5
        for section, values in (overrides or {}).items():
            if isinstance(values, dict):
                settings.setdefault(section, {}).update(values)
            else:
                settings[section] = values
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(yaml.safe_dump(settings, sort_keys=False))
        return target


class EngineProcess:
    """`fdqr run` as a separate process, as it runs in production."""

    def __init__(
        self,
        config: Path,
        mllp_port: int,
        log_path: Path,
        log_level: str = "INFO",
        mllp_host: str = "127.0.0.1",
    ) -> None:
        self.config = config
        self.mllp_port = mllp_port
        self.mllp_host = mllp_host
        self.log_path = log_path
        self.log_level = log_level
        # The engine's temporary files (received objects too large for memory),
        # kept apart so that a test can check that none is left behind.
        self.temp_dir = log_path.parent / f"{log_path.stem}-tmp"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self._log = log
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        # faulthandler writes every thread's stack to the log on SIGABRT (see stop).
        environment = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            PYTHONFAULTHANDLER="1",
            TMPDIR=str(self.temp_dir),
        )
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine.cli",
                "run",
                "--config",
                str(self.config),
                "--log-level",
                self.log_level,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=environment,
            cwd=REPOSITORY,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"fdqr run exited with status {self._process.returncode}; see {self.log_path}"
                )
            try:
                wait_for_port(self.mllp_host, self.mllp_port, timeout=0.5)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"fdqr run did not listen within {timeout}s") from None

    def stop(self, timeout: float = 30.0) -> int:
        """Send SIGTERM and wait; return the exit status.

        A process that does not end in time gets SIGABRT, which makes it write
        its threads' stacks to the log, and then SIGKILL.
        """
        if self._process is None:
            return 0
        self._process.send_signal(signal.SIGTERM)
        try:
            status = self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._process.send_signal(signal.SIGABRT)
            try:
                status = self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                status = self._process.wait()
        self._process = None
        self._log.close()
        return status

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def send_signal(self, number: int) -> None:
        """Send a signal to the running engine, e.g. SIGHUP to reload the rules."""
        if self._process is None:
            raise RuntimeError("fdqr run is not running")
        self._process.send_signal(number)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_for_newest_job(store_path: Path, timeout: float, poll_seconds: float) -> JobRecord:
    """Wait until the newest job in the store at store_path has finished, and return it.

    Raises TimeoutError when it has not finished within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if store_path.exists():
            store = Store(store_path)
            try:
                jobs = store.list_jobs(1)
            finally:
                store.close()
            if jobs and jobs[0].state.finished:
                return jobs[0]
        time.sleep(poll_seconds)
    raise TimeoutError(f"the job did not finish within {timeout:.0f} s")
