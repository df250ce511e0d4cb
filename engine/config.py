"""Engine settings (conf/engine.yaml), and loading the whole configuration.

A PACS administrator owns conf/; integration analysts own routes/ and rules/.
load() reads all of them, checks the references between them, and reports
every problem at once.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Annotated, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from engine.configfile import ConfigError, Problem, load_document, validate
from engine.identity.table import CrossReferenceTable, load_table
from engine.rules.loader import load_rule_set
from engine.rules.model import RuleSet

AE_TITLE_PATTERN = r"^[\x20-\x5b\x5d-\x7e]{1,16}$"  # 16 characters, no backslash
AETitle = Annotated[str, Field(pattern=AE_TITLE_PATTERN)]
Port = Annotated[int, Field(ge=1, le=65535)]


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DicomSettings(Settings):
    """The engine's own DICOM application entity."""

    ae_title: AETitle = "FDQR"
    host: str = "127.0.0.1"
    port: Port = 11112
    max_pdu_bytes: int = Field(default=262144, ge=0)


class MLLPSettings(Settings):
    """The HL7 listener. listen is a Twisted endpoint string (tcp:PORT:interface=HOST, ssl:...)."""

    listen: str = "tcp:2575:interface=127.0.0.1"
    max_message_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    idle_timeout_seconds: float = Field(default=600, gt=0)
    default_charset: str = "UNICODE UTF-8"

    @pydantic.field_validator("listen")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if not re.match(r"^(tcp|ssl|unix|tls):", value):
            raise ValueError("listen must be a Twisted endpoint string such as tcp:2575")
        return value


class LocalPatientSettings(Settings):
    """How the local patient identifier is found in PID-3 and which issuer it has."""

    issuer: str = Field(min_length=1)
    authorities: list[str] = Field(default_factory=list)
    unqualified_ids_are_local: bool = False


class Node(Settings):
    """A remote DICOM node: a source PACS or a destination."""

    ae_title: AETitle
    host: str
    port: Port
    issuer: str | None = None
    max_associations: int = Field(default=2, ge=1, le=64)
    timeout_seconds: float = Field(default=30, gt=0)
    # How studies are retrieved from this node: C-MOVE to the engine's AE, C-GET on
    # the same association, or C-GET with fallback to C-MOVE when the node refuses it.
    retrieve: Literal["move", "get", "auto"] = "move"
    # A destination without a Query/Retrieve SCP (e.g. DCMTK storescp): the engine
    # cannot ask what it holds, so a study counts as stored when every C-STORE succeeded.
    store_only: bool = False


class StoreSettings(Settings):
    path: Path = Path("../var/fdqr.sqlite")


class SpoolSettings(Settings):
    path: Path = Path("../var/spool")
    fsync: bool = True
    # Received objects wait here until the destination confirmed them; at this size
    # the Storage SCP holds each new object up to full_wait_seconds, then refuses it.
    max_bytes: int = Field(default=20 * 1024**3, ge=1024**2)
    full_wait_seconds: float = Field(default=20, ge=0)


class TransferSettings(Settings):
    """How studies move from a source through the engine to the destination."""

    # A retrieve still running after this long is aborted and retried later.
    study_deadline_seconds: float = Field(default=3600, gt=0)
    # Associations that store one study into the destination at the same time.
    destination_associations: int = Field(default=2, ge=1, le=16)
    # Passes that fetch again only the instances the destination is missing.
    repair_passes: int = Field(default=1, ge=0, le=5)
    # Transient association rejections are retried after 1, 2, 4 ... seconds.
    association_attempts: int = Field(default=4, ge=1, le=20)
    association_retry_seconds: float = Field(default=1, gt=0)


class JobSettings(Settings):
    concurrency: int = Field(default=2, ge=1, le=64)
    max_attempts: int = Field(default=5, ge=1)
    retry_delay_seconds: float = Field(default=30, gt=0)
    max_retry_delay_seconds: float = Field(default=1800, gt=0)
    poll_seconds: float = Field(default=5, gt=0)


class IdentitySettings(Settings):
    table: Path | None = None


class EngineSettings(Settings):
    """The top level of conf/engine.yaml."""

    dicom: DicomSettings = DicomSettings()
    mllp: MLLPSettings = MLLPSettings()
    local_patient: LocalPatientSettings
    nodes: dict[str, Node]
    identity: IdentitySettings = IdentitySettings()
    store: StoreSettings = StoreSettings()
    spool: SpoolSettings = SpoolSettings()
    jobs: JobSettings = JobSettings()
    transfer: TransferSettings = TransferSettings()
    routes: Path = Path("../routes")
    rules: Path = Path("../rules")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the engine needs, loaded and cross-checked."""

    path: Path
    settings: EngineSettings
    rule_set: RuleSet
    identity_table: CrossReferenceTable

    def resolve(self, path: Path) -> Path:
        return resolve(self.path, path)

    @property
    def store_path(self) -> Path:
        return self.resolve(self.settings.store.path)

    @property
    def spool_path(self) -> Path:
        return self.resolve(self.settings.spool.path)


def resolve(config_path: Path, path: Path) -> Path:
    """Resolve a path from engine.yaml relative to the folder that contains it."""
    return path if path.is_absolute() else (config_path.parent / path).resolve()


def load_settings(path: Path) -> EngineSettings:
    return validate(load_document(path), EngineSettings)


def load(path: Path) -> Config:
    """Load conf/engine.yaml and everything it names. Raises ConfigError listing every problem."""
    document = load_document(path)
    settings = validate(document, EngineSettings)
    problems: list[Problem] = []

    rule_set = RuleSet.empty()
    try:
        rule_set = load_rule_set(resolve(path, settings.routes), resolve(path, settings.rules))
    except ConfigError as error:
        problems += error.problems

    table = CrossReferenceTable.empty()
    if settings.identity.table is not None:
        try:
            table = load_table(resolve(path, settings.identity.table))
        except ConfigError as error:
            problems += error.problems

    problems += _check_references(document.file, document.line_of, settings, rule_set)
    if problems:
        raise ConfigError(problems)
    return Config(path=path.resolve(), settings=settings, rule_set=rule_set, identity_table=table)


def _check_references(
    file: str,
    line_of: object,
    settings: EngineSettings,
    rule_set: RuleSet,
) -> list[Problem]:
    problems: list[Problem] = []
    nodes = settings.nodes
    for route in rule_set.routes:
        for index, source in enumerate(route.sources):
            if source not in nodes:
                problems.append(
                    route.problem(
                        ("sources", index),
                        f"unknown node '{source}'",
                        f"define it under nodes in {file}; known: {', '.join(sorted(nodes))}",
                    )
                )
            elif nodes[source].issuer is None:
                problems.append(
                    route.problem(
                        ("sources", index),
                        f"source node '{source}' has no issuer",
                        f"set nodes.{source}.issuer in {file} to its patient identifier domain",
                    )
                )
        if route.destination not in nodes:
            problems.append(
                route.problem(
                    ("destination",),
                    f"unknown node '{route.destination}'",
                    f"define it under nodes in {file}; known: {', '.join(sorted(nodes))}",
                )
            )
    return problems
