"""Running real Orthanc servers on loopback for the demo and the integration tests.

Each server gets its own folder, free ports, and a configuration that allows
Find, Move and Get from any AE, so tests need no per-client set-up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from engine.testing.ports import PausableProcess, free_port, stop_process, wait_for_port

ORTHANC_BINARY = "Orthanc"
START_TIMEOUT_SECONDS = 30.0


class OrthancError(Exception):
    pass


def dcmtk_environment() -> dict[str, str]:
    """Return the environment for DCMTK-based programs (Orthanc, storescp, movescu ...).

    DCMTK disables Nagle's algorithm only when TCP_NODELAY is set; without it
    every C-STORE waits on a delayed ACK (measured here: 100 small instances by
    C-MOVE from Orthanc took 4.8 s without it and 0.5 s with it).
    """
    return dict(os.environ, TCP_NODELAY="1")


class OrthancServer(PausableProcess):
    """One Orthanc process: a DICOM AE on loopback, and its REST API for loading and checking."""

    def __init__(
        self,
        name: str,
        ae_title: str,
        folder: Path,
        modalities: dict[str, tuple[str, str, int]] | None = None,
        dicom_port: int | None = None,
        extra_settings: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.ae_title = ae_title
        self.folder = folder
        self.host = "127.0.0.1"
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        self.modalities = dict(modalities or {})
        self.extra_settings = dict(extra_settings or {})
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def settings(self) -> dict[str, Any]:
        storage = str(self.folder / "storage")
        settings: dict[str, Any] = {
            "Name": self.name,
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "Plugins": [],
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowGet": True,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {
                key: [aet, host, port] for key, (aet, host, port) in self.modalities.items()
            },
            "SyncStorageArea": False,
            "SaveJobs": False,
            "StableAge": 1,
            "HttpThreadsCount": 8,
            "DicomThreadsCount": 4,
            "DicomScuTimeout": 30,
            "DicomScpTimeout": 30,
            "ConcurrentJobs": 2,
            "DeidentifyLogs": True,
            "MetricsEnabled": False,
        }
        settings.update(self.extra_settings)
        return settings

    def start(self) -> None:
        if shutil.which(ORTHANC_BINARY) is None:
            raise OrthancError(
                f"'{ORTHANC_BINARY}' not found on PATH: install the Debian package 'orthanc' "
                "(make test and make demo install it)"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        config_path = self.folder / "orthanc.json"
        config_path.write_text(json.dumps(self.settings(), indent=2))
        log = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115 (closed in stop)
        self._process = subprocess.Popen(
            [ORTHANC_BINARY, str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dcmtk_environment(),
        )
        self._log = log
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise OrthancError(
                    f"Orthanc {self.name} exited with status {self._process.returncode}; "
                    f"see {self.folder / 'orthanc.log'}"
                )
            try:
                self.get("/system")
                wait_for_port(self.host, self.dicom_port, timeout=START_TIMEOUT_SECONDS)
                return
            except (OSError, OrthancError):
                time.sleep(0.1)
        self.stop()
        raise OrthancError(f"Orthanc {self.name} did not start within {START_TIMEOUT_SECONDS}s")

    def stop(self) -> None:
        if self._process is None:
            return
        stop_process(self._process)
        self._process = None
        self._log.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    # REST API

    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(self.base_url + path, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", "application/dicom")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                data: bytes = response.read()
                return data
        except urllib.error.HTTPError as error:
            raise OrthancError(
                f"{method} {path} at Orthanc {self.name}: HTTP {error.code}"
            ) from None
        except urllib.error.URLError as error:
            raise OrthancError(f"{method} {path} at Orthanc {self.name}: {error.reason}") from None

    def get(self, path: str) -> Any:
        return json.loads(self._request("GET", path))

    def post_json(self, path: str, payload: Any) -> Any:
        body = json.dumps(payload).encode()
        request = urllib.request.Request(self.base_url + path, data=body, method="POST")
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def upload(self, dicom_file: bytes) -> str:
        """Store one DICOM file through the REST API; return its Orthanc instance id."""
        answer = json.loads(self._request("POST", "/instances", dicom_file))
        return str(answer["ID"])

    def study_ids(self) -> list[str]:
        return list(self.get("/studies"))

    def studies(self) -> list[dict[str, Any]]:
        """Return every study with its DICOM tags and instance ids."""
        result = []
        for study_id in self.study_ids():
            study = self.get(f"/studies/{study_id}")
            instances = self.get(f"/studies/{study_id}/instances")
            study["InstanceIds"] = [instance["ID"] for instance in instances]
            result.append(study)
        return result

    def study_uids(self) -> set[str]:
        return {study["MainDicomTags"]["StudyInstanceUID"] for study in self.studies()}

    def instance_file(self, instance_id: str) -> bytes:
        return self._request("GET", f"/instances/{instance_id}/file")

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])
