"""Engine settings (conf/engine.yaml), and loading the whole configuration.

A PACS administrator owns conf/; integration analysts own routes/ and rules/.
load() reads all of them, checks the references between them, and reports
every problem at once.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Annotated

import pydantic
from pydantic import BaseModel, ConfigDict, Field
from twisted.internet.ssl import CertificateOptions

from engine.configfile import ConfigError, Document, Problem, load_document, validate
from engine.hl7.message import CharsetDefaults, codec_for_charset
from engine.hl7.tls import TLSConfigError, server_options
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


class MLLPTLSSettings(Settings):
    """MLLP over TLS: the listener's certificate and key, and the CAs of accepted clients.

    Without client_ca any client may connect; with it, a client must present
    a certificate signed by one of the CAs in that PEM file.
    """

    certificate: Path
    private_key: Path
    client_ca: Path | None = None


class MLLPSettings(Settings):
    """The HL7 listener. listen is a Twisted endpoint string (tcp:PORT:interface=HOST, ssl:...)."""

    listen: str = "tcp:2575:interface=127.0.0.1"
    max_message_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    idle_timeout_seconds: float = Field(default=600, gt=0)
    default_charset: str = "UNICODE UTF-8"
    # Character set per sender for an empty MSH-18, keyed by "APPLICATION^FACILITY"
    # (MSH-3 and MSH-4, first components) or "APPLICATION" for any facility.
    sender_charsets: dict[str, str] = Field(default_factory=dict)
    tls: MLLPTLSSettings | None = None

    @pydantic.field_validator("listen")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if not re.match(r"^(tcp|ssl|unix|tls):", value):
            raise ValueError("listen must be a Twisted endpoint string such as tcp:2575")
        return value

    @pydantic.field_validator("default_charset")
    @classmethod
    def _charset(cls, value: str) -> str:
        if codec_for_charset(value) is None:
            raise ValueError(f"unknown character set '{value}' (use e.g. UNICODE UTF-8, 8859/1)")
        return value

    @pydantic.field_validator("sender_charsets")
    @classmethod
    def _sender_charsets(cls, value: dict[str, str]) -> dict[str, str]:
        for sender, charset in value.items():
            if codec_for_charset(charset) is None:
                raise ValueError(
                    f"unknown character set '{charset}' for sender '{sender}'"
                    " (use e.g. UNICODE UTF-8, 8859/1)"
                )
            if sender.count("^") > 1 or not sender.split("^")[0]:
                raise ValueError(
                    f"invalid sender '{sender}' (use APPLICATION^FACILITY or APPLICATION)"
                )
        return value

    @pydantic.model_validator(mode="after")
    def _tls_over_tcp(self) -> MLLPSettings:
        if self.tls is not None and not self.listen.startswith("tcp:"):
            raise ValueError(
                f"mllp.tls needs a tcp: listen endpoint (it adds TLS itself); got '{self.listen}'"
            )
        return self

    def charsets(self) -> CharsetDefaults:
        by_sender = {}
        for sender, charset in self.sender_charsets.items():
            application, _, facility = sender.partition("^")
            by_sender[(application, facility)] = charset
        return CharsetDefaults(self.default_charset, by_sender)


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


# A store path that keeps the store in memory, lost when the engine stops (for benchmarks).
MEMORY_STORE = ":memory:"


class StoreSettings(Settings):
    path: Path = Path("../var/fdqr.sqlite")


class SpoolSettings(Settings):
    path: Path = Path("../var/spool")
    fsync: bool = True


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
        if str(self.settings.store.path) == MEMORY_STORE:
            return self.settings.store.path
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
    problems += _check_mllp_tls(document, path, settings)
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


def _check_mllp_tls(document: Document, path: Path, settings: EngineSettings) -> list[Problem]:
    tls = settings.mllp.tls
    if tls is None:
        return []
    try:
        mllp_tls_options(path, tls)
    except TLSConfigError as error:
        return [document.problem(("mllp", "tls"), str(error))]
    return []


def mllp_tls_options(config_path: Path, tls: MLLPTLSSettings) -> CertificateOptions:
    """Load the listener's TLS options, with paths relative to the configuration file."""
    return server_options(
        resolve(config_path, tls.certificate),
        resolve(config_path, tls.private_key),
        resolve(config_path, tls.client_ca) if tls.client_ca is not None else None,
    )
