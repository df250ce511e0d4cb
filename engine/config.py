"""Engine settings (conf/engine.yaml), and loading the whole configuration.

A PACS administrator owns conf/; integration analysts own routes/ and rules/.
load() reads all of them, checks the references between them, and reports
every problem at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from twisted.internet.ssl import CertificateOptions

from engine.auditstream import tls_options
from engine.coercion import CoercionProfile
from engine.coercion_config import CoercionSettings, build_profiles, check_coercion
from engine.configfile import (
    ConfigError,
    Document,
    PathKey,
    Problem,
    check_ae_title,
    load_document,
    validate,
)
from engine.federation.settings import FederationSettings, check_federation
from engine.hl7.events import PROCESSING_IDS
from engine.hl7.message import CharsetDefaults, codec_for_charset
from engine.hl7.tls import TLSConfigError, server_options
from engine.identity.build import check_identity
from engine.identity.settings import IdentitySettings
from engine.identity.table import CrossReferenceTable, load_table
from engine.jobs.policy import SourcePolicy
from engine.rules.anatomy import Anatomy, load_anatomy
from engine.rules.loader import read_rule_set, yaml_files
from engine.rules.model import RuleSet
from engine.rules.timing import LocalZone, QuietWindow, check_zone, parse_days, parse_hours

AETitle = Annotated[str, AfterValidator(check_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DicomSettings(Settings):
    """The engine's own DICOM application entity."""

    ae_title: AETitle = "FDQR"
    host: str = "127.0.0.1"
    port: Port = 11112
    max_pdu_bytes: int = Field(default=262144, ge=0)


def endpoint_port(value: str) -> int | None:
    """Return the port of a tcp:, tcp6: or ssl: endpoint string, None for other kinds.

    Raises ValueError when the port is missing, not a number, or out of range.
    """
    kind, _, rest = value.partition(":")
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    parts = rest.split(":")
    text = next((part[len("port=") :] for part in parts if part.startswith("port=")), None)
    if text is None and parts and "=" not in parts[0]:
        text = parts[0]
    if text is None or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"invalid port in '{value}': use a number from 1 to 65535")
    return int(text)


def is_tcp(listen: str) -> bool:
    """Tell whether an endpoint string listens on plain TCP, over IPv4 or IPv6."""
    return listen.startswith(("tcp:", "tcp6:"))


def check_listen(value: str, example: str) -> str:
    """Return a listening endpoint string, or raise ValueError saying what is wrong with it."""
    if not re.match(r"^(tcp|tcp6|ssl|unix):", value):
        raise ValueError(
            f"listen must be a Twisted endpoint string such as {example}"
            " (tcp:, tcp6: for IPv6, ssl: or unix:)"
        )
    endpoint_port(value)
    # Building the endpoint parses it and, for ssl:, reads its files; nothing listens yet.
    from twisted.internet import endpoints

    try:
        endpoints.serverFromString(object(), value)  # type: ignore[no-untyped-call]
    except Exception as error:
        hint = ""
        if re.search(r"interface=[^\\]*:", value):
            hint = r"; escape the colons of an IPv6 address, e.g. interface=\:\:1"
        raise ValueError(f"cannot use '{value}': {error}{hint}") from None
    return value


def strip_text(value: object) -> object:
    """Drop the spaces around a text value, which DICOM does not count (an issuer)."""
    return value.strip() if isinstance(value, str) else value


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
    # MSH-11 processing IDs accepted (HL7 Table 0103: P production, T training,
    # D debugging); a message with another one gets AR 202.
    processing_ids: list[str] = Field(default_factory=lambda: ["P"], min_length=1)
    tls: MLLPTLSSettings | None = None
    # Processes of their own that read, plan and store HL7 messages, each serving
    # the connections the engine passes it. With 0 the engine process does it.
    processes: int = Field(default=0, ge=0, le=16, strict=True)

    @pydantic.field_validator("listen")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return check_listen(value, "tcp:2575")

    @pydantic.field_validator("default_charset")
    @classmethod
    def _charset(cls, value: str) -> str:
        if codec_for_charset(value) is None:
            raise ValueError(f"unknown character set '{value}' (use e.g. UNICODE UTF-8, 8859/1)")
        return value

    @pydantic.field_validator("processing_ids")
    @classmethod
    def _processing_ids(cls, value: list[str]) -> list[str]:
        for item in value:
            if item not in PROCESSING_IDS:
                raise ValueError(f"unknown processing ID '{item}' (use P, T or D, HL7 Table 0103)")
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
        if self.tls is not None and not is_tcp(self.listen):
            raise ValueError(
                f"mllp.tls needs a tcp: or tcp6: listen endpoint (it adds TLS itself);"
                f" got '{self.listen}'"
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

    _issuer = pydantic.field_validator("issuer", mode="before")(strip_text)


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
    _issuer = pydantic.field_validator("issuer", mode="before")(strip_text)
    # Allows another node with the same issuer: two archives of one identifier domain.
    # Without it a repeated issuer is an error, since one site's IDs would be read as
    # the other's.
    shared_issuer: bool = False


# A store path that keeps the store in memory, lost when the engine stops (for benchmarks).
MEMORY_STORE = ":memory:"


class WebSettings(Settings):
    """The HTTP listener: status page, JSON API, Prometheus metrics and a liveness check.

    listen is a Twisted endpoint string; None turns the listener off. The pages
    have no authentication, so keep it on a local or management interface.
    """

    listen: str | None = None
    # How often the job counts by state (fdqr_jobs) are read from the store.
    refresh_seconds: float = Field(default=15, gt=0)

    @pydantic.field_validator("listen")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return value
        return check_listen(value, "tcp:9464")


class AuditTLSSettings(Settings):
    """TLS to the audit repository: the CAs its certificate must chain to, and the
    engine's own certificate and key when the repository requires one.
    """

    ca: Path
    certificate: Path | None = None
    private_key: Path | None = None

    @pydantic.model_validator(mode="after")
    def _certificate_with_key(self) -> AuditTLSSettings:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("give both certificate and private_key, or neither")
        return self


class AuditSettings(Settings):
    """IHE ATNA audit records (DICOM PS3.15 audit messages in RFC 5424 syslog messages).

    syslog sends each record to an audit repository: udp:HOST:PORT (RFC
    5426), tcp:HOST:PORT or tls:HOST:PORT (RFC 5425, with the tls section).
    file appends each one as a line. With neither, no records are made.
    """

    syslog: str | None = None
    tls: AuditTLSSettings | None = None
    file: Path | None = None
    # AuditSourceID; the engine's AE title when empty.
    source_id: str = ""
    # AuditEnterpriseSiteID, e.g. the hospital's name or OID.
    site: str = ""

    @pydantic.field_validator("syslog")
    @classmethod
    def _syslog_address(cls, value: str | None) -> str | None:
        if value is not None:
            syslog_address(value)
        return value

    @pydantic.field_validator("file", mode="before")
    @classmethod
    def _file_named(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            raise ValueError("the audit file is empty: name a file, e.g. ../var/audit.log")
        return value

    @pydantic.model_validator(mode="after")
    def _tls_with_tls_address(self) -> AuditSettings:
        kind = syslog_address(self.syslog)[0] if self.syslog is not None else None
        if kind == "tls" and self.tls is None:
            raise ValueError(
                f"syslog '{self.syslog}' needs a tls section naming at least the ca file"
            )
        if kind != "tls" and self.tls is not None:
            raise ValueError(f"a tls section needs a tls: syslog address; got '{self.syslog}'")
        return self


def syslog_address(value: str) -> tuple[str, str, int]:
    """Return (kind, host, port) of udp:, tcp: or tls:HOST:PORT.

    Raises ValueError naming the value otherwise.
    """
    match = re.fullmatch(r"(udp|tcp|tls):(\[[^\]\s]+\]|[^:\[\]\s]+):(\d+)", value)
    if match is None or not 1 <= int(match.group(3)) <= 65535:
        raise ValueError(
            f"invalid syslog address '{value}': use udp:HOST:PORT, tcp:HOST:PORT or"
            " tls:HOST:PORT, e.g. tls:audit.example.org:6514"
        )
    return match.group(1), match.group(2).strip("[]"), int(match.group(3))


class StoreSettings(Settings):
    path: Path = Path("../var/fdqr.sqlite")
    # Messages and finished jobs older than this are deleted; None keeps them all.
    # strict: YAML's true or "30" is no number of days.
    retention_days: int | None = Field(default=None, ge=1, le=36500, strict=True)


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

    @pydantic.model_validator(mode="after")
    def _first_delay_within_cap(self) -> JobSettings:
        if self.retry_delay_seconds > self.max_retry_delay_seconds:
            raise ValueError(
                f"retry_delay_seconds ({self.retry_delay_seconds:g}) is above"
                f" max_retry_delay_seconds ({self.max_retry_delay_seconds:g}), which caps every"
                " retry delay; raise the maximum or lower the first delay"
            )
        return self


class WorklistSource(Settings):
    """A Modality Worklist SCP to poll, and which of its steps to consider."""

    node: str
    station_ae_titles: list[AETitle] = Field(default_factory=list)
    modalities: list[str] = Field(default_factory=list)

    @pydantic.field_validator("modalities")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [modality.upper() for modality in value]


class WorklistSettings(Settings):
    """Polling Modality Worklists for scheduled steps, so they prefetch like HL7 orders."""

    sources: list[WorklistSource] = Field(default_factory=list)
    poll_seconds: float = Field(default=300, ge=5)
    look_ahead_hours: float = Field(default=24, gt=0, le=24 * 31)
    # A step that started less than this long ago is still polled, so a late poll
    # does not read a running exam as removed from the worklist.
    grace_minutes: float = Field(default=30, ge=0)


class QuietHoursSettings(Settings):
    """Wall-clock hours when a source serves no retrieves, or only small studies."""

    days: str | list[str] = "daily"
    hours: str
    # Studies of at most this many instances may still be retrieved; absent: none.
    max_instances: int | None = Field(default=None, ge=0)

    @pydantic.field_validator("days")
    @classmethod
    def _days(cls, value: str | list[str]) -> str | list[str]:
        parse_days(value)
        return value

    @pydantic.field_validator("hours", mode="before")
    @classmethod
    def _hours(cls, value: object) -> object:
        parse_hours(value)
        return value

    def window(self) -> QuietWindow:
        start, end = parse_hours(self.hours)
        return QuietWindow(parse_days(self.days), start, end, self.max_instances)


class SourceSettings(Settings):
    """How the engine queries a source node and schedules its retrieves."""

    modality_matching: Literal["one_per_query", "list", "local"] = "one_per_query"
    date_matching: Literal["range", "local"] = "range"
    max_retrieves: int | None = Field(default=None, ge=1, le=64)
    quiet_hours: list[QuietHoursSettings] = Field(default_factory=list)

    def policy(self) -> SourcePolicy:
        return SourcePolicy(
            modality_matching=self.modality_matching,
            date_matching=self.date_matching,
            max_retrieves=self.max_retrieves,
            quiet_hours=tuple(window.window() for window in self.quiet_hours),
        )


class EngineSettings(Settings):
    """The top level of conf/engine.yaml."""

    dicom: DicomSettings = DicomSettings()
    mllp: MLLPSettings = MLLPSettings()
    web: WebSettings = WebSettings()
    audit: AuditSettings = AuditSettings()
    local_patient: LocalPatientSettings
    nodes: dict[str, Node]
    identity: IdentitySettings = IdentitySettings()
    coercion: CoercionSettings = CoercionSettings()
    store: StoreSettings = StoreSettings()
    spool: SpoolSettings = SpoolSettings()
    jobs: JobSettings = JobSettings()
    worklist: WorklistSettings = WorklistSettings()
    federation: FederationSettings = FederationSettings()
    transfer: TransferSettings = TransferSettings()
    routes: Path = Path("../routes")
    rules: Path = Path("../rules")
    # The anatomy table of body regions; without one, regions relate only to themselves.
    anatomy: Path | None = None
    # IANA time zone of quiet hours and of HL7 times without an offset; default: the system's.
    time_zone: str | None = None
    # Per-source query and retrieve policies, by node name.
    sources: dict[str, SourceSettings] = Field(default_factory=dict)
    # How often `fdqr run` checks routes/, rules/ and the anatomy table for changes; 0: never
    # (SIGHUP still reloads).
    rules_reload_seconds: float = Field(default=2.0, ge=0)

    @pydantic.field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        return check_zone(value) if value is not None else None

    @property
    def zone(self) -> LocalZone:
        return LocalZone(self.time_zone)

    def source_policies(self) -> dict[str, SourcePolicy]:
        return {name: source.policy() for name, source in self.sources.items()}


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the engine needs, loaded and cross-checked."""

    path: Path
    settings: EngineSettings
    rule_set: RuleSet
    identity_table: CrossReferenceTable
    # The coercion profile of each destination that has one configured.
    coercion_profiles: dict[str, CoercionProfile] = dataclasses.field(default_factory=dict)

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

    @property
    def audit_file(self) -> Path | None:
        path = self.settings.audit.file
        return None if path is None else self.resolve(path)


def resolve(config_path: Path, path: Path) -> Path:
    """Resolve a path from engine.yaml relative to the folder that contains it."""
    return path if path.is_absolute() else (config_path.parent / path).resolve()


def load_settings(path: Path) -> EngineSettings:
    return validate(load_document(path), EngineSettings)


def load(path: Path) -> Config:
    """Load conf/engine.yaml and everything it names. Raises ConfigError listing every problem."""
    document = load_document(path)
    try:
        settings = validate(document, EngineSettings)
    except ConfigError as error:
        # The rule files are checked as well, so every problem shows at once.
        raise ConfigError(error.problems + _rule_file_problems(document, path)) from None
    problems = _missing_paths(document, path, settings)
    missing = {problem.path for problem in problems}

    rule_set = RuleSet.empty()
    # The rules are still checked when a path is missing, so every problem shows at once.
    rules_settings = settings
    if "anatomy" in missing:
        rules_settings = settings.model_copy(update={"anatomy": None})
    reported = {str(resolve(path, getattr(settings, key))) for key in missing & {"routes", "rules"}}
    try:
        rule_set = load_rules(path, rules_settings)
    except ConfigError as error:
        problems += [
            problem
            for problem in error.problems
            if not (problem.file in reported and problem.message == "folder not found")
        ]

    table = CrossReferenceTable.empty()
    node_issuers = {node.issuer for node in settings.nodes.values() if node.issuer}
    local_issuer = settings.local_patient.issuer
    if settings.identity.table is not None and "identity.table" not in missing:
        known_domains = node_issuers | set(settings.identity.domains)
        try:
            table = load_table(resolve(path, settings.identity.table), local_issuer, known_domains)
        except ConfigError as error:
            problems += error.problems

    problems += _check_worklist_nodes(document, settings)
    problems += _check_issuers(document, settings)
    problems += _check_ports(document, settings)
    problems += _check_node_titles(document, settings)
    problems += check_identity(document, settings.identity, local_issuer, node_issuers)
    problems += check_coercion(
        document,
        settings.coercion,
        settings.identity,
        set(settings.nodes),
        settings.local_patient.issuer,
    )
    problems += _check_sources(document, settings)
    problems += check_federation(document, settings)
    problems += _check_mllp_tls(document, path, settings)
    problems += _check_intake_processes(document, settings)
    problems += _check_audit_tls(document, path, settings)
    if problems:
        raise ConfigError(problems)
    return Config(
        path=path.resolve(),
        settings=settings,
        rule_set=rule_set,
        identity_table=table,
        coercion_profiles=build_profiles(
            settings.coercion, settings.identity, settings.dicom.ae_title
        ),
    )


def _missing_paths(document: Document, path: Path, settings: EngineSettings) -> list[Problem]:
    """Return a problem for each file or folder that engine.yaml names and that does not exist."""
    named: list[tuple[PathKey, Path | None, str]] = [
        (("routes",), settings.routes, "folder"),
        (("rules",), settings.rules, "folder"),
        (("anatomy",), settings.anatomy, "file"),
        (("identity", "table"), settings.identity.table, "file"),
    ]
    problems = []
    for key, value, kind in named:
        if value is None:
            continue
        target = resolve(path, value)
        exists = target.is_dir() if kind == "folder" else target.is_file()
        if not exists:
            problems.append(
                document.problem(
                    key,
                    f"{kind} {target} not found, from the value '{value}'",
                    f"a relative path is resolved from the folder of {path.name}",
                )
            )
    return problems + _unusable_data_paths(document, path, settings)


def _unusable_data_paths(document: Document, path: Path, settings: EngineSettings) -> list[Problem]:
    """Return a problem for a store file or spool folder that cannot be created where named.

    Both are created at start when missing, so only a file in the way is a problem.
    """
    named: list[tuple[PathKey, Path, Path]] = []
    if str(settings.store.path) != MEMORY_STORE:
        store = resolve(path, settings.store.path)
        named.append((("store", "path"), settings.store.path, store.parent))
        if store.is_dir():
            return [
                document.problem(
                    ("store", "path"),
                    f"{store} is a folder, from the value '{settings.store.path}'",
                    "name the SQLite file, e.g. ../var/fdqr.sqlite",
                )
            ]
    named.append((("spool", "path"), settings.spool.path, resolve(path, settings.spool.path)))
    problems = []
    if settings.audit.file is not None:
        audit_file = resolve(path, settings.audit.file)
        named.append((("audit", "file"), settings.audit.file, audit_file.parent))
        if audit_file.is_dir():
            problems.append(
                document.problem(
                    ("audit", "file"),
                    f"{audit_file} is a folder, from the value '{settings.audit.file}'",
                    "name the file the records are appended to, e.g. ../var/audit.log",
                )
            )
    for key, value, folder in named:
        # The nearest part of the folder's path that exists must be a folder.
        existing = next((part for part in (folder, *folder.parents) if part.exists()), None)
        if existing is not None and not existing.is_dir():
            problems.append(
                document.problem(
                    key,
                    f"{existing} is a file, so the folder {folder} cannot be created,"
                    f" from the value '{value}'",
                    "name a path under a folder",
                )
            )
    return problems


def _rule_file_problems(document: Document, path: Path) -> list[Problem]:
    """Return the problems of the rule files of an engine.yaml that failed validation.

    The folders and the anatomy table are read from the raw file, where it names
    them as text, and nodes are not checked, because the settings did not load.
    """
    data = document.data if isinstance(document.data, dict) else {}
    fields = EngineSettings.model_fields
    folders = {}
    for key in ("routes", "rules", "anatomy"):
        value = data.get(key, fields[key].default)
        folders[key] = resolve(path, Path(value)) if isinstance(value, str | Path) else None
    if folders["routes"] is None or folders["rules"] is None:
        return []
    anatomy = Anatomy.empty()
    problems: list[Problem] = []
    if folders["anatomy"] is not None and folders["anatomy"].is_file():
        anatomy_path = folders["anatomy"]
        try:
            anatomy = load_anatomy(anatomy_path, f"{anatomy_path.parent.name}/{anatomy_path.name}")
        except ConfigError as error:
            problems += error.problems
    _, found = read_rule_set(folders["routes"], folders["rules"], anatomy)
    return problems + found


def load_rules(path: Path, settings: EngineSettings) -> RuleSet:
    """Load the anatomy table, routes and rules named by engine settings, and check the
    nodes routes name. Raises ConfigError listing every problem; used at start and on reload.
    """
    problems: list[Problem] = []
    anatomy = Anatomy.empty()
    if settings.anatomy is not None:
        anatomy_path = resolve(path, settings.anatomy)
        try:
            anatomy = load_anatomy(anatomy_path, f"{anatomy_path.parent.name}/{anatomy_path.name}")
        except ConfigError as error:
            problems += error.problems
    rule_set, found = read_rule_set(
        resolve(path, settings.routes), resolve(path, settings.rules), anatomy
    )
    # The nodes of the routes that loaded are checked too, so every problem shows at once.
    problems += found + _check_references(str(path), settings, rule_set)
    if problems:
        raise ConfigError(problems)
    return rule_set


def rule_files(path: Path, settings: EngineSettings) -> list[Path]:
    """Return every file a rule set is loaded from, to watch for changes."""
    files = [
        *yaml_files(resolve(path, settings.routes)),
        *yaml_files(resolve(path, settings.rules)),
    ]
    if settings.anatomy is not None:
        files.append(resolve(path, settings.anatomy))
    return files


def _check_sources(document: Document, settings: EngineSettings) -> list[Problem]:
    problems = []
    for name in settings.sources:
        node = settings.nodes.get(name)
        if node is None:
            problems.append(
                document.problem(
                    ("sources", name),
                    f"unknown node '{name}'",
                    f"define it under nodes; known: {', '.join(sorted(settings.nodes))}",
                )
            )
        elif node.issuer is None:
            problems.append(
                document.problem(
                    ("sources", name),
                    f"node '{name}' is not a source (it has no issuer)",
                    f"set nodes.{name}.issuer to its patient identifier domain",
                )
            )
    return problems


_ALL_INTERFACES = ("", "0.0.0.0", "::")


def _endpoint_interface(value: str) -> str:
    parts = value.split(":")
    return next((part[len("interface=") :] for part in parts if part.startswith("interface=")), "")


def _check_ports(document: Document, settings: EngineSettings) -> list[Problem]:
    """Return a problem when two of the engine's listeners bind the same port and address."""
    listeners: list[tuple[PathKey, int | None, str]] = [
        (("dicom", "port"), settings.dicom.port, settings.dicom.host),
        (
            ("mllp", "listen"),
            endpoint_port(settings.mllp.listen),
            _endpoint_interface(settings.mllp.listen),
        ),
    ]
    if settings.web.listen is not None:
        web = settings.web.listen
        listeners.append((("web", "listen"), endpoint_port(web), _endpoint_interface(web)))
    problems = []
    for index, (key, port, interface) in enumerate(listeners):
        for other_key, other_port, other_interface in listeners[:index]:
            overlap = (
                interface == other_interface
                or interface in _ALL_INTERFACES
                or other_interface in _ALL_INTERFACES
            )
            if port is not None and port == other_port and overlap:
                other = ".".join(str(part) for part in other_key)
                problems.append(
                    document.problem(
                        key,
                        f"port {port} is also the port of {other}",
                        "give each listener its own port",
                    )
                )
                break
    return problems


def _check_issuers(document: Document, settings: EngineSettings) -> list[Problem]:
    """Return a problem for each node whose issuer another node has, unless both share it."""
    problems = []
    first_with: dict[str, str] = {}
    for name, node in settings.nodes.items():
        if node.issuer is None:
            continue
        other = first_with.setdefault(node.issuer, name)
        if other == name or (node.shared_issuer and settings.nodes[other].shared_issuer):
            continue
        problems.append(
            document.problem(
                ("nodes", name, "issuer"),
                f"issuer '{node.issuer}' is also the issuer of node '{other}'",
                "give each site's patient IDs their own issuer; when both nodes are archives"
                f" of one identifier domain, set shared_issuer: true on {other} and {name}",
            )
        )
    return problems


def _check_worklist_nodes(document: Document, settings: EngineSettings) -> list[Problem]:
    problems = []
    for index, source in enumerate(settings.worklist.sources):
        if source.node not in settings.nodes:
            problems.append(
                document.problem(
                    ("worklist", "sources", index, "node"),
                    f"unknown node '{source.node}'",
                    f"define it under nodes; known: {', '.join(sorted(settings.nodes))}",
                )
            )
    return problems


def _check_references(file: str, settings: EngineSettings, rule_set: RuleSet) -> list[Problem]:
    problems: list[Problem] = []
    nodes = settings.nodes
    local_issuer = settings.local_patient.issuer
    # The nodes a route may name there: sources have an issuer, destinations none or the
    # local one and are no worklist.
    worklists = {source.node for source in settings.worklist.sources}
    sources = ", ".join(sorted(name for name, node in nodes.items() if node.issuer)) or "none"
    destinations = (
        ", ".join(
            sorted(
                name
                for name, node in nodes.items()
                if node.issuer in (None, local_issuer) and name not in worklists
            )
        )
        or "none"
    )
    for route in rule_set.routes:
        for index, source in enumerate(route.sources):
            if source not in nodes:
                problems.append(
                    route.problem(
                        ("sources", index),
                        f"unknown node '{source}'",
                        f"define it under nodes in {file}; source nodes: {sources}",
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
        destination = nodes.get(route.destination)
        if destination is None:
            problems.append(
                route.problem(
                    ("destination",),
                    f"unknown node '{route.destination}'",
                    f"define it under nodes in {file}; nodes that can be destinations:"
                    f" {destinations}",
                )
            )
        elif destination.issuer not in (None, local_issuer):
            # Objects are stamped with local IDs; a PACS that files them by PatientID
            # alone would put them under its own patient who has that ID.
            problems.append(
                route.problem(
                    ("destination",),
                    f"destination '{route.destination}' is a node of domain"
                    f" {destination.issuer}, but objects are stamped with {local_issuer} IDs",
                    f"name the local PACS; a destination has no issuer or {local_issuer}",
                )
            )
    return problems


def _check_node_titles(document: Document, settings: EngineSettings) -> list[Problem]:
    """Return a problem for a node that is the engine's own AE, or a repeat of another node."""
    problems = []
    engine_title = settings.dicom.ae_title.strip()
    seen: dict[tuple[str, str, int], str] = {}
    for name, node in settings.nodes.items():
        title = node.ae_title.strip()
        if title == engine_title:
            problems.append(
                document.problem(
                    ("nodes", name, "ae_title"),
                    f"AE title '{title}' is the engine's own (dicom.ae_title)",
                    "give the engine and each node its own AE title",
                )
            )
        address = (title, node.host, node.port)
        other = seen.setdefault(address, name)
        if other != name:
            problems.append(
                document.problem(
                    ("nodes", name),
                    f"node '{name}' has the AE title, host and port of node '{other}'",
                    "remove one of them, or correct the copied values",
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


def settings_digest(settings: EngineSettings, table: CrossReferenceTable) -> str:
    """Return a digest of the settings and the identity table an intake process must share."""
    text = settings.model_dump_json() + "\n" + table.canonical()
    return hashlib.sha256(text.encode()).hexdigest()


def _check_intake_processes(document: Document, settings: EngineSettings) -> list[Problem]:
    mllp = settings.mllp
    if not mllp.processes:
        return []
    problems = []
    if not is_tcp(mllp.listen):
        problems.append(
            document.problem(
                ("mllp", "processes"),
                "intake processes need a tcp: or tcp6: listen endpoint; mllp.listen is"
                f" '{mllp.listen}'"
                " (use tcp: with mllp.tls for TLS, or processes: 0)",
            )
        )
    if str(settings.store.path) == MEMORY_STORE:
        problems.append(
            document.problem(
                ("mllp", "processes"),
                f"intake processes share the store file; store.path '{MEMORY_STORE}' has none"
                " (use 0, or a store file)",
            )
        )
    return problems


def _check_audit_tls(document: Document, path: Path, settings: EngineSettings) -> list[Problem]:
    audit = settings.audit
    if audit.syslog is None or audit.tls is None:
        return []
    try:
        audit_tls_options(path, audit.syslog, audit.tls)
    except TLSConfigError as error:
        return [document.problem(("audit", "tls"), str(error))]
    return []


def audit_tls_options(config_path: Path, syslog: str, tls: AuditTLSSettings) -> Any:
    """Load the TLS options for the audit repository, with paths relative to the configuration."""
    _, host, _ = syslog_address(syslog)
    return tls_options(
        host,
        resolve(config_path, tls.ca),
        resolve(config_path, tls.certificate) if tls.certificate is not None else None,
        resolve(config_path, tls.private_key) if tls.private_key is not None else None,
    )


def mllp_tls_options(config_path: Path, tls: MLLPTLSSettings) -> CertificateOptions:
    """Load the listener's TLS options, with paths relative to the configuration file."""
    return server_options(
        resolve(config_path, tls.certificate),
        resolve(config_path, tls.private_key),
        resolve(config_path, tls.client_ca) if tls.client_ca is not None else None,
    )
