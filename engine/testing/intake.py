"""An engine configuration for HL7 intake alone: no PACS needs to run.

Nodes point at loopback ports where nothing listens, and the shipped identity
table does not know INTAKE_PATIENT, so the jobs its orders create end at the
identity step without any network traffic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from engine.testing.dicomgen import PatientSpec
from engine.testing.ports import free_port
from engine.testing.sites import shipped_settings

INTAKE_PATIENT = PatientSpec("INTAKE-1", "LOCAL", "INTAKE^PATIENT", "19700101", "O")


def write_intake_config(
    folder: Path, store: str, mllp: dict[str, Any] | None = None
) -> tuple[Path, int]:
    """Write engine.yaml into folder, from conf/engine.yaml; return it and the MLLP port.

    store is the store path, and ":memory:" keeps the store in memory. mllp
    overrides settings of the mllp section. A `listen` given there contains
    "{port}" where the returned port goes, e.g. "ssl:{port}:...".
    """
    settings = shipped_settings()
    port = free_port()
    settings["dicom"]["port"] = free_port()
    settings["mllp"]["listen"] = f"tcp:{port}:interface=127.0.0.1"
    settings["web"]["listen"] = f"tcp:{free_port()}:interface=127.0.0.1"
    for key, value in (mllp or {}).items():
        settings["mllp"][key] = value.format(port=port) if key == "listen" else value
    for node in settings["nodes"].values():
        node["host"] = "127.0.0.1"
        node["port"] = free_port()
    settings["store"]["path"] = store
    settings["spool"]["path"] = str(folder / "spool")
    settings["audit"]["file"] = str(folder / "audit.log")
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "engine.yaml"
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    return config, port
