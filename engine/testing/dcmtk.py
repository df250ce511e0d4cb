"""DCMTK peers on loopback for tests and benchmarks: storescp and dcmqrscp.

Both run with TCP_NODELAY=1 (see dcmtk_environment()). storescp accepts only
the uncompressed transfer syntaxes unless told otherwise, which makes it the
uncompressed-only destination some viewers and archives are.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from engine.testing.orthanc import dcmtk_environment
from engine.testing.ports import PausableProcess, free_port, stop_process, wait_for_port


class DcmtkProcess(PausableProcess):
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.host = "127.0.0.1"
        self.dicom_port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._log: object = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "dcmtk.log", "ab")  # noqa: SIM115 (closed in stop)
        self._log = log
        self._process = subprocess.Popen(
            self.command(), env=dcmtk_environment(), stdout=log, stderr=subprocess.STDOUT
        )
        wait_for_port(self.host, self.dicom_port)

    def stop(self) -> None:
        if self._process is None:
            return
        stop_process(self._process)
        self._process = None
        self._log.close()  # type: ignore[attr-defined]


class StoreSCP(DcmtkProcess):
    """DCMTK storescp writing each received object into `folder/received`."""

    def __init__(
        self,
        folder: Path,
        ae_title: str = "STORESCP",
        max_pdu: int = 16384,
        bit_preserving: bool = False,
    ) -> None:
        super().__init__(folder)
        self.ae_title = ae_title
        self.max_pdu = max_pdu
        # Write each dataset exactly as received, and accept every transfer syntax.
        self.bit_preserving = bit_preserving

    @property
    def received(self) -> Path:
        return self.folder / "received"

    def command(self) -> list[str]:
        self.received.mkdir(parents=True, exist_ok=True)
        return [
            "storescp",
            "--aetitle",
            self.ae_title,
            "--max-pdu",
            str(self.max_pdu),
            "--output-directory",
            str(self.received),
            *(["--bit-preserving", "--accept-all"] if self.bit_preserving else []),
            str(self.dicom_port),
        ]

    def files(self) -> list[Path]:
        return sorted(path for path in self.received.iterdir() if path.is_file())


class QueryRetrieveSCP(DcmtkProcess):
    """DCMTK dcmqrscp: a Query/Retrieve SCP (C-FIND, C-MOVE, C-GET) with its own storage.

    max_associations is dcmqrscp's MaxAssociations: further associations are
    rejected (transient, local limit exceeded) while that many are open.
    move_destinations maps AE titles to (host, port) for C-MOVE.
    """

    def __init__(
        self,
        folder: Path,
        ae_title: str,
        move_destinations: dict[str, tuple[str, int]],
        max_associations: int = 16,
        extra_arguments: tuple[str, ...] = (),
    ) -> None:
        super().__init__(folder)
        self.ae_title = ae_title
        self.move_destinations = move_destinations
        self.max_associations = max_associations
        self.extra_arguments = extra_arguments

    def write_config(self) -> Path:
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        hosts = [
            f"{ae.lower()} = ({ae}, {host}, {port})"
            for ae, (host, port) in self.move_destinations.items()
        ]
        config = self.folder / "dcmqrscp.cfg"
        config.write_text(
            "\n".join(
                [
                    f"NetworkTCPPort  = {self.dicom_port}",
                    "MaxPDUSize      = 131072",
                    f"MaxAssociations = {self.max_associations}",
                    "HostTable BEGIN",
                    *hosts,
                    "HostTable END",
                    "VendorTable BEGIN",
                    "VendorTable END",
                    "AETable BEGIN",
                    f"{self.ae_title} {storage} RW (500, 1024mb) ANY",
                    "AETable END",
                    "",
                ]
            )
        )
        return config

    def command(self) -> list[str]:
        return [
            "dcmqrscp",
            "--config",
            str(self.write_config()),
            *self.extra_arguments,
        ]

    def upload(self, dicom_file: bytes) -> None:
        """Store one DICOM file into this SCP's storage with storescu."""
        with tempfile.NamedTemporaryFile(suffix=".dcm", dir=self.folder) as handle:
            handle.write(dicom_file)
            handle.flush()
            subprocess.run(
                ["storescu", "-aec", self.ae_title, self.host, str(self.dicom_port), handle.name],
                env=dcmtk_environment(),
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
