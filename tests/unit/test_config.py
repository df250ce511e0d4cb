"""Loading conf/engine.yaml with the routes, rules and identity table it names."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TypeVar

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from twisted.internet.defer import Deferred

from engine import config
from engine.configfile import ConfigError, Problem
from engine.identity.resolver import TableResolver
from engine.identity.table import load_table
from engine.model import PatientIdentifier
from engine.testing.certificates import certificate_authority, issue

REPOSITORY = Path(__file__).resolve().parents[2]
T = TypeVar("T")


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """A copy of the shipped conf/, routes/ and rules/; return the engine.yaml path."""
    for folder in ("conf", "routes", "rules"):
        shutil.copytree(REPOSITORY / folder, tmp_path / folder)
    return tmp_path / "conf" / "engine.yaml"


def edit(path: Path, change: dict[str, object]) -> None:
    settings = yaml.safe_load(path.read_text())
    for dotted, value in change.items():
        *parents, last = dotted.split(".")
        target = settings
        for part in parents:
            target = target[part]
        target[last] = value
    path.write_text(yaml.safe_dump(settings, sort_keys=False))


def only_problem(layout: Path, change: dict[str, object]) -> Problem:
    """Apply change to engine.yaml and return the one problem loading it reports."""
    edit(layout, change)
    with pytest.raises(ConfigError) as raised:
        config.load(layout)
    [problem] = raised.value.problems
    return problem


def test_shipped_configuration_is_valid(layout: Path) -> None:
    loaded = config.load(layout)
    assert sorted(loaded.settings.nodes) == ["hospital_a", "hospital_b", "local_pacs", "ris_mwl"]
    assert [route.name for route in loaded.rule_set.routes] == ["ris-orders", "worklist-orders"]
    assert len(loaded.rule_set.anatomy) > 10
    assert loaded.store_path == (layout.parent.parent / "var" / "fdqr.sqlite").resolve()
    assert len(loaded.identity_table) == 2


def test_errors_name_file_line_path_value(layout: Path) -> None:
    text = (
        layout.read_text()
        .replace("port: 4301", "port: 99999")
        .replace("ae_title: HOSP_B", "ae_title: HOSPITAL_B_TOO_LONG_NAME")
    )
    layout.write_text(text)
    with pytest.raises(ConfigError) as raised:
        config.load(layout)
    messages = [str(problem) for problem in raised.value.problems]
    assert len(messages) == 2
    line = next(number for number, row in enumerate(text.splitlines(), 1) if "99999" in row)
    assert (
        messages[0]
        == f"{layout}:{line}: nodes.hospital_a.port: input should be less than or equal to 65535 (value 99999)"
    )
    assert "nodes.hospital_b.ae_title" in messages[1]
    assert "'HOSPITAL_B_TOO_LONG_NAME'" in messages[1]


def test_route_naming_unknown_node(layout: Path) -> None:
    routes = layout.parent.parent / "routes" / "orders.yaml"
    routes.write_text(
        routes.read_text().replace("destination: local_pacs", "destination: pacs_typo", 1)
    )
    with pytest.raises(ConfigError) as raised:
        config.load(layout)
    [problem] = raised.value.problems
    assert problem.file == "routes/orders.yaml"
    assert problem.path == "routes[0].destination"
    assert problem.message == "unknown node 'pacs_typo'"
    # Sources of another domain cannot be destinations. The worklist node is not polled yet.
    assert problem.hint.endswith("; nodes that can be destinations: local_pacs, ris_mwl")


def test_worklist_node_not_offered_as_destination(layout: Path) -> None:
    edit(layout, {"worklist.sources": [{"node": "ris_mwl"}]})
    routes = layout.parent.parent / "routes" / "orders.yaml"
    routes.write_text(
        routes.read_text().replace("destination: local_pacs", "destination: pacs_typo", 1)
    )
    with pytest.raises(ConfigError) as raised:
        config.load(layout)
    [problem] = raised.value.problems
    assert problem.hint.endswith("; nodes that can be destinations: local_pacs")


def test_source_without_issuer(layout: Path) -> None:
    edit(layout, {"nodes.hospital_b.issuer": None})
    with pytest.raises(ConfigError) as raised:
        config.load(layout)
    assert "routes[0].sources[1]: source node 'hospital_b' has no issuer" in str(raised.value)


def test_worklist_source_must_be_a_node(layout: Path) -> None:
    problem = only_problem(
        layout,
        {"worklist.sources": [{"node": "ris_mwl"}, {"node": "mwl_typo", "modalities": ["ct"]}]},
    )
    assert problem.path == "worklist.sources[1].node"
    assert problem.message == "unknown node 'mwl_typo'"


def test_missing_folder_and_table(layout: Path) -> None:
    edit(layout, {"rules": "../no_rules", "identity.table": "missing.yaml"})
    with pytest.raises(ConfigError) as raised:
        config.load(layout)
    problems = {problem.path: problem for problem in raised.value.problems}
    assert sorted(problems) == ["identity.table", "rules"]
    rules = problems["rules"]
    assert rules.file.endswith("engine.yaml")
    assert rules.line is not None
    assert rules.message == (
        f"folder {layout.parent.parent / 'no_rules'} not found, from the value '../no_rules'"
    )
    assert rules.hint == "a relative path is resolved from the folder of engine.yaml"
    table = problems["identity.table"]
    assert table.message == (
        f"file {layout.parent / 'missing.yaml'} not found, from the value 'missing.yaml'"
    )


def test_repeated_issuer_rejected(layout: Path) -> None:
    # A copy-paste slip: hospital_b's IDs would be read as hospital_a's.
    edit(layout, {"nodes.hospital_b.issuer": "HOSP_A"})
    with pytest.raises(ConfigError) as raised:
        config.load(layout)
    # The identity table's HOSP_B rows now name an unknown domain too.
    [problem] = [p for p in raised.value.problems if p.path.startswith("nodes")]
    assert problem.path == "nodes.hospital_b.issuer"
    assert problem.message == "issuer 'HOSP_A' is also the issuer of node 'hospital_a'"
    assert "set shared_issuer: true on hospital_a and hospital_b" in problem.hint


def test_shared_issuer_allowed_on_both(layout: Path) -> None:
    edit(
        layout,
        {
            "nodes.hospital_b.issuer": "HOSP_A",
            "nodes.hospital_b.shared_issuer": True,
            "nodes.hospital_a.shared_issuer": True,
            "identity.table": None,
        },
    )
    loaded = config.load(layout)
    assert loaded.settings.nodes["hospital_b"].issuer == "HOSP_A"
    # One of the two alone is not enough.
    edit(layout, {"nodes.hospital_a.shared_issuer": False})
    with pytest.raises(ConfigError, match="also the issuer of node 'hospital_a'"):
        config.load(layout)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("L9,LOCAL,HB-9,HOSPB", "unknown domain 'HOSPB' of HB-9^^^HOSPB"),
        ("L9,LOCL,HB-9,HOSP_B", "local identifier L9^^^LOCL is not in the local domain LOCAL"),
        ("L9,LOCAL,L10,LOCAL", "L10^^^LOCAL is in the local domain, not another one"),
        ("L9,LOCAL,HB-9\\X,HOSP_B", "patient ID of HOSP_B contains a backslash"),
    ],
)
def test_identity_table_rows_checked(layout: Path, row: str, message: str) -> None:
    table = layout.parent / "identity.csv"
    table.write_text(f"local_id,local_issuer,remote_id,remote_issuer\n{row}\n")
    problem = only_problem(layout, {"identity.table": "identity.csv"})
    assert problem.path == "row 2"
    assert problem.message.startswith(message)


@pytest.mark.parametrize("setting", ["store.path", "spool.path", "audit.file"])
def test_data_path_under_a_file(layout: Path, setting: str) -> None:
    (layout.parent / "afile").write_text("not a folder")
    problem = only_problem(layout, {setting: "afile/data/fdqr.sqlite"})
    assert problem.path == setting
    assert problem.message.startswith(f"{layout.parent / 'afile'} is a file, so the folder")
    assert problem.message.endswith("from the value 'afile/data/fdqr.sqlite'")


def test_store_path_naming_a_folder(layout: Path) -> None:
    (layout.parent / "var").mkdir()
    problem = only_problem(layout, {"store.path": "var"})
    assert problem.path == "store.path"
    assert problem.message == f"{layout.parent / 'var'} is a folder, from the value 'var'"


def test_audit_file_naming_a_folder(layout: Path) -> None:
    (layout.parent / "var").mkdir()
    problem = only_problem(layout, {"audit.file": "var"})
    assert problem.path == "audit.file"
    assert problem.message == f"{layout.parent / 'var'} is a folder, from the value 'var'"


@pytest.mark.parametrize(
    ("change", "path", "message"),
    [
        (
            {"audit.syslog": "tls:127.0.0.1:6514"},
            "audit",
            "syslog 'tls:127.0.0.1:6514' needs a tls section naming at least the ca file",
        ),
        (
            {"audit.syslog": "udp:127.0.0.1:514", "audit.tls": {"ca": "ca.pem"}},
            "audit",
            "a tls section needs a tls: syslog address; got 'udp:127.0.0.1:514'",
        ),
        (
            {
                "audit.syslog": "tls:127.0.0.1:6514",
                "audit.tls": {"ca": "ca.pem", "certificate": "c.pem"},
            },
            "audit.tls",
            "give both certificate and private_key, or neither",
        ),
    ],
)
def test_audit_tls_settings_checked(
    layout: Path, change: dict[str, object], path: str, message: str
) -> None:
    edit(layout, change)
    with pytest.raises(ConfigError) as raised:
        config.load(layout)
    [problem] = raised.value.problems
    assert problem.path == path
    assert message in problem.message


def test_audit_tls_ca_file_missing_named(layout: Path) -> None:
    problem = only_problem(
        layout, {"audit.syslog": "tls:127.0.0.1:6514", "audit.tls": {"ca": "no-ca.pem"}}
    )
    assert problem.path == "audit.tls"
    assert problem.message.startswith(
        f"cannot load CA certificates from {layout.parent / 'no-ca.pem'}"
    )


def test_audit_file_empty_rejected(layout: Path) -> None:
    problem = only_problem(layout, {"audit.file": ""})
    assert problem.path == "audit.file"
    assert "the audit file is empty: name a file" in problem.message


def test_audit_tls_key_of_another_certificate_named(layout: Path) -> None:
    pki = layout.parent / "pki"
    authority = certificate_authority(pki)
    first = issue(pki, authority, "first", server=False)
    second = issue(pki, authority, "second", server=False)
    problem = only_problem(
        layout,
        {
            "audit.syslog": "tls:127.0.0.1:6514",
            "audit.tls": {
                "ca": str(authority.certificate_path),
                "certificate": str(first.certificate_path),
                "private_key": str(second.key_path),
            },
        },
    )
    assert problem.path == "audit.tls"
    assert problem.message.startswith(
        f"cannot load certificate {first.certificate_path} with key {second.key_path}:"
    )


def test_audit_syslog_address_checked(layout: Path) -> None:
    problem = only_problem(layout, {"audit.syslog": "syslog.example.org:514"})
    assert problem.path == "audit.syslog"
    assert "invalid syslog address 'syslog.example.org:514': use udp:HOST:PORT" in problem.message


@pytest.mark.parametrize(
    ("setting", "value"), [("anatomy", "missing.yaml"), ("routes", "../no_routes")]
)
def test_missing_path_still_checks_rules(layout: Path, setting: str, value: str) -> None:
    edit(layout, {setting: value})
    (layout.parent.parent / "rules" / "broken.yaml").write_text("rules: [\n")
    with pytest.raises(ConfigError) as raised:
        config.load(layout)
    problems = raised.value.problems
    assert [problem.path for problem in problems if problem.file.endswith("engine.yaml")] == [
        setting
    ]
    assert any(
        problem.file.endswith("broken.yaml") and "invalid YAML" in problem.message
        for problem in problems
    )
    assert not any(problem.message == "folder not found" for problem in problems)


def test_identity_table_lookup(layout: Path) -> None:
    table = load_table(layout.parent / "identity.yaml")
    local = PatientIdentifier("L12345", "LOCAL")
    assert table.lookup(local, "HOSP_A") == PatientIdentifier("HA-778899", "HOSP_A")
    assert table.lookup(local, "HOSP_C") is None
    assert table.lookup(local, "LOCAL") == local
    assert table.lookup(PatientIdentifier("L12345", "OTHER"), "HOSP_A") is None


def test_identity_table_rejects_conflicts(tmp_path: Path) -> None:
    path = tmp_path / "identity.yaml"
    path.write_text(
        "cross_references:\n"
        "  - local: {id: L1, issuer: LOCAL}\n"
        "    remote: [{id: A1, issuer: A}]\n"
        "  - local: {id: L2, issuer: LOCAL}\n"
        "    remote: [{id: A1, issuer: A}]\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_table(path)
    assert str(raised.value) == (
        f"{path}:5: cross_references[1].remote[0]: A1^^^A is already mapped to local patient "
        "L1^^^LOCAL (one remote identifier belongs to one local patient)"
    )


def test_table_resolver_answers_both_ways(layout: Path) -> None:
    resolver = TableResolver(load_table(layout.parent / "identity.yaml"), "LOCAL")
    local = PatientIdentifier("L12345", "LOCAL")
    remote = PatientIdentifier("HB-4455", "HOSP_B")

    found = successResultOf(resolver.resolve(local, "HOSP_B"))
    assert found.identifier == remote
    assert found.source == "table"
    missing = successResultOf(resolver.resolve(local, "HOSP_C"))
    assert missing.identifier is None
    assert missing.detail == "no entry for L12345^^^LOCAL in domain HOSP_C"

    assert successResultOf(resolver.local_for(remote)).identifier == local
    assert (
        successResultOf(resolver.local_for(PatientIdentifier("HB-1", "HOSP_B"))).identifier is None
    )


def successResultOf(deferred: Deferred[T]) -> T:
    results: list[T] = []
    deferred.addCallback(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def test_sender_charsets_loaded(layout: Path) -> None:
    edit(layout, {"mllp.sender_charsets": {"OLDRIS^RAD": "8859/1", "LAB": "WINDOWS-1252"}})
    charsets = config.load(layout).settings.mllp.charsets()
    assert charsets.for_sender("OLDRIS", "RAD") == "8859/1"
    assert charsets.for_sender("OLDRIS", "ER") == "UNICODE UTF-8"
    assert charsets.for_sender("LAB", "ANY") == "WINDOWS-1252"


def test_sender_charsets_unknown_name_reported(layout: Path) -> None:
    problem = only_problem(layout, {"mllp.sender_charsets": {"OLDRIS": "KLINGON"}})
    assert problem.path == "mllp.sender_charsets"
    assert "unknown character set 'KLINGON' for sender 'OLDRIS'" in problem.message
    assert problem.line is not None


def test_processing_ids_default_and_unknown_reported(layout: Path) -> None:
    assert config.load(layout).settings.mllp.processing_ids == ["P"]
    problem = only_problem(layout, {"mllp.processing_ids": ["P", "X"]})
    assert problem.path == "mllp.processing_ids"
    assert "unknown processing ID 'X' (use P, T or D, HL7 Table 0103)" in problem.message


def test_memory_store_path_kept(layout: Path) -> None:
    edit(layout, {"store.path": ":memory:"})
    assert str(config.load(layout).store_path) == ":memory:"


def test_accept_and_ignore_loaded_with_routes(layout: Path) -> None:
    routes = layout.parent.parent / "routes" / "orders.yaml"
    routes.write_text(
        routes.read_text()
        + "accept_and_ignore:\n  - message_type: [ORU^R01, ADT^A08]\n    sending_application: LAB\n"
    )
    [entry] = config.load(layout).rule_set.accept_and_ignore
    assert entry.spec.message_type == ["ORU^R01", "ADT^A08"]
    assert entry.spec.sending_application == ["LAB"]
    assert entry.where == "routes/orders.yaml accept_and_ignore[0]"


def test_accept_and_ignore_needs_message_type(layout: Path) -> None:
    routes = layout.parent.parent / "routes" / "orders.yaml"
    text = routes.read_text()
    routes.write_text(text + "accept_and_ignore:\n  - sending_application: LAB\n")
    item_line = len(text.splitlines()) + 2
    with pytest.raises(ConfigError) as raised:
        config.load(layout)
    [problem] = raised.value.problems
    assert str(problem) == (
        f"routes/orders.yaml:{item_line}: accept_and_ignore[0].message_type: missing required setting"
    )


def test_mllp_tls_loaded_relative_to_config(layout: Path) -> None:
    authority = certificate_authority(layout.parent / "pki")
    server = issue(layout.parent / "pki", authority, "engine", server=True)
    edit(
        layout,
        {
            "mllp.tls": {
                "certificate": "pki/engine.crt.pem",
                "private_key": "pki/engine.key.pem",
                "client_ca": "pki/ca.crt.pem",
            }
        },
    )
    loaded = config.load(layout)
    assert loaded.settings.mllp.tls is not None
    options = config.mllp_tls_options(loaded.path, loaded.settings.mllp.tls)
    assert options.verify
    assert server.certificate_path.exists()


def test_mllp_tls_missing_file_reported(layout: Path) -> None:
    problem = only_problem(
        layout, {"mllp.tls": {"certificate": "missing.pem", "private_key": "missing.key"}}
    )
    assert problem.path == "mllp.tls"
    assert "cannot load certificate" in problem.message
    assert "missing.pem" in problem.message


def _pki_files(layout: Path) -> dict[str, Path]:
    """Return the engine's certificate and key, their DER forms, a CSR and a CA file."""
    pki = layout.parent / "pki"
    authority = certificate_authority(pki)
    server = issue(pki, authority, "engine", server=True)
    certificate = x509.load_pem_x509_certificate(server.certificate_path.read_bytes())
    key = serialization.load_pem_private_key(server.key_path.read_bytes(), None)
    files = {
        "certificate": server.certificate_path,
        "key": server.key_path,
        "der certificate": pki / "engine.crt.der",
        "der key": pki / "engine.key.der",
        "csr": pki / "engine.csr",
    }
    files["der certificate"].write_bytes(certificate.public_bytes(serialization.Encoding.DER))
    files["der key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(certificate.subject)
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    files["csr"].write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return files


@pytest.mark.parametrize(
    ("certificate", "key", "expected"),
    [
        ("csr", "key", "engine.csr contains no PEM certificate (found: CERTIFICATE REQUEST)"),
        ("certificate", "certificate", "engine.crt.pem contains no PEM private key"),
        ("der certificate", "key", "engine.crt.der is in DER form, not PEM: convert it with"),
        ("certificate", "der key", "`openssl pkey -inform DER -in"),
    ],
)
def test_mllp_tls_file_of_wrong_kind_named(
    layout: Path, certificate: str, key: str, expected: str
) -> None:
    files = _pki_files(layout)
    problem = only_problem(
        layout,
        {"mllp.tls": {"certificate": str(files[certificate]), "private_key": str(files[key])}},
    )
    assert problem.path == "mllp.tls"
    assert expected in problem.message


def test_mllp_tls_needs_tcp_listen(layout: Path) -> None:
    problem = only_problem(
        layout,
        {
            "mllp.listen": "unix:/tmp/fdqr-mllp.sock",
            "mllp.tls": {"certificate": "c.pem", "private_key": "k.pem"},
        },
    )
    assert problem.path == "mllp"
    assert "mllp.tls needs a tcp: or tcp6: listen endpoint" in problem.message


def test_ssl_listen_with_missing_key_file_named(layout: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.key.pem"
    problem = only_problem(layout, {"mllp.listen": f"ssl:2575:privateKey={missing}"})
    assert problem.path == "mllp.listen"
    assert f"cannot use 'ssl:2575:privateKey={missing}'" in problem.message
    assert "No such file or directory" in problem.message


def test_first_retry_delay_above_cap_named(layout: Path) -> None:
    problem = only_problem(
        layout, {"jobs.retry_delay_seconds": 3000, "jobs.max_retry_delay_seconds": 1800}
    )
    assert problem.path == "jobs"
    assert problem.message.startswith(
        "retry_delay_seconds (3000) is above max_retry_delay_seconds (1800)"
    )


@pytest.mark.parametrize("listen", ["tcp6:2575:interface=\\:\\:1", "tcp:2575:interface=\\:\\:1"])
def test_ipv6_listen_accepted(layout: Path, listen: str) -> None:
    edit(layout, {"mllp.listen": listen, "mllp.processes": 2})
    assert config.load(layout).settings.mllp.listen == listen


def test_intake_processes_need_tcp_listen(layout: Path) -> None:
    problem = only_problem(layout, {"mllp.listen": "unix:/tmp/fdqr-mllp.sock", "mllp.processes": 2})
    assert problem.path == "mllp.processes"
    assert "need a tcp: or tcp6: listen endpoint; mllp.listen is 'unix:/tmp/fdqr-mllp.sock'" in (
        problem.message
    )


def test_intake_processes_need_a_store_file(layout: Path) -> None:
    problem = only_problem(layout, {"store.path": ":memory:", "mllp.processes": 2})
    assert problem.path == "mllp.processes"
    assert "store.path ':memory:' has none" in problem.message


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        *[("mllp.processes", value) for value in (17, -1, "2", True, 2.5)],
        *[("store.retention_days", value) for value in (0, -1, "30 days", 100_000, True, "30")],
    ],
)
def test_invalid_value_named(layout: Path, setting: str, value: object) -> None:
    problem = only_problem(layout, {setting: value})
    assert problem.path == setting


@pytest.mark.parametrize(("value", "spelled"), [(True, "true"), (False, "false"), (None, "null")])
def test_problem_spells_value_as_yaml(layout: Path, value: object, spelled: str) -> None:
    problem = only_problem(layout, {"mllp.processes": value})
    assert problem.message.endswith(f"(value {spelled})")


def test_mllp_tls_client_ca_without_certificates(layout: Path) -> None:
    pki = layout.parent / "pki"
    authority = certificate_authority(pki)
    issue(pki, authority, "engine", server=True)
    (pki / "empty.pem").write_text("no certificates here\n")
    problem = only_problem(
        layout,
        {
            "mllp.tls": {
                "certificate": "pki/engine.crt.pem",
                "private_key": "pki/engine.key.pem",
                "client_ca": "pki/empty.pem",
            }
        },
    )
    assert "empty.pem contains no PEM certificate" in problem.message


def test_repeated_yaml_keys_rejected(layout: Path) -> None:
    text = layout.read_text().replace("    port: 4302\n", "    port: 4302\n    port: 4312\n", 1)
    layout.write_text(text)
    with pytest.raises(ConfigError) as raised:
        config.load(layout)
    [problem] = raised.value.problems
    first = next(number for number, row in enumerate(text.splitlines(), 1) if "4302" in row)
    assert problem.path == "nodes.hospital_b.port"
    assert problem.line == first + 1
    assert problem.message == f"key 'port' repeated: line {first} has it first"


def test_repeated_key_in_routes_file(layout: Path) -> None:
    routes = layout.parent.parent / "routes" / "orders.yaml"
    routes.write_text(
        routes.read_text().replace(
            "destination: local_pacs", "destination: local_pacs\n    destination: hospital_a", 1
        )
    )
    with pytest.raises(ConfigError) as raised:
        config.load(layout)
    assert [problem.path for problem in raised.value.problems] == ["routes[0].destination"]
    assert raised.value.problems[0].file == "routes/orders.yaml"


def test_error_names_number_value(layout: Path) -> None:
    edit(layout, {"nodes.hospital_a.timeout_seconds": 0, "nodes.hospital_b.ae_title": "A\\B"})
    with pytest.raises(ConfigError) as raised:
        config.load(layout)
    messages = {problem.path: problem.message for problem in raised.value.problems}
    assert messages["nodes.hospital_a.timeout_seconds"] == (
        "input should be greater than 0 (value 0)"
    )
    assert messages["nodes.hospital_b.ae_title"] == (
        "invalid AE title 'A\\\\B': use 1 to 16 characters, without backslash or control characters"
    )


PORT_RANGE = "use a number from 1 to 65535"
IPV6_HINT = "; escape the colons of an IPv6 address, e.g. interface=\\:\\:1"


@pytest.mark.parametrize(
    ("listen", "start", "end"),
    [
        ("tcp:99999:interface=127.0.0.1", "invalid port in 'tcp:99999:", PORT_RANGE),
        ("tcp:port=0", "invalid port in 'tcp:port=0'", PORT_RANGE),
        ("ssl:abc:privateKey=k.pem", "invalid port in 'ssl:abc:", PORT_RANGE),
        ("tcp6:2575:interface=::1", "cannot use 'tcp6:2575:interface=::1': ", IPV6_HINT),
        ("tcp:2575:interface=::1", "cannot use 'tcp:2575:interface=::1': ", IPV6_HINT),
    ],
)
def test_mllp_listen_invalid_named(layout: Path, listen: str, start: str, end: str) -> None:
    problem = only_problem(layout, {"mllp.listen": listen})
    assert problem.path == "mllp.listen"
    assert problem.message.startswith(start)
    assert problem.message.endswith(end)


def test_listeners_sharing_a_port(layout: Path) -> None:
    edit(layout, {"mllp.listen": "tcp:11112:interface=127.0.0.1", "web.listen": "tcp:port=11112"})
    with pytest.raises(ConfigError) as raised:
        config.load(layout)
    messages = {problem.path: problem.message for problem in raised.value.problems}
    assert messages == {
        "mllp.listen": "port 11112 is also the port of dicom.port",
        "web.listen": "port 11112 is also the port of dicom.port",
    }


def test_route_destination_of_another_domain(layout: Path) -> None:
    routes = layout.parent.parent / "routes" / "orders.yaml"
    routes.write_text(
        routes.read_text().replace("destination: local_pacs", "destination: hospital_a", 1)
    )
    with pytest.raises(ConfigError) as raised:
        config.load(layout)
    [problem] = raised.value.problems
    assert problem.path == "routes[0].destination"
    assert problem.message == (
        "destination 'hospital_a' is a node of domain HOSP_A, but objects are stamped with"
        " LOCAL IDs"
    )


def test_node_with_engine_title_or_copied(layout: Path) -> None:
    settings = yaml.safe_load(layout.read_text())
    settings["nodes"]["hospital_c"] = dict(settings["nodes"]["hospital_b"], issuer="HOSP_C")
    settings["nodes"]["local_pacs"]["ae_title"] = "FDQR"
    layout.write_text(yaml.safe_dump(settings, sort_keys=False))
    with pytest.raises(ConfigError) as raised:
        config.load(layout)
    messages = {problem.path: problem.message for problem in raised.value.problems}
    assert messages == {
        "nodes.local_pacs.ae_title": "AE title 'FDQR' is the engine's own (dicom.ae_title)",
        "nodes.hospital_c": (
            "node 'hospital_c' has the AE title, host and port of node 'hospital_b'"
        ),
    }


def test_same_port_on_other_interface_allowed(layout: Path) -> None:
    edit(layout, {"web.listen": "tcp:11112:interface=127.0.0.2"})
    assert config.load(layout).settings.web.listen == "tcp:11112:interface=127.0.0.2"


def test_issuer_spaces_dropped(layout: Path) -> None:
    edit(layout, {"nodes.hospital_b.issuer": " HOSP_A "})
    with pytest.raises(ConfigError) as raised:
        config.load(layout)
    assert any(
        problem.message == "issuer 'HOSP_A' is also the issuer of node 'hospital_a'"
        for problem in raised.value.problems
    )


def test_engine_and_rule_errors_reported_together(layout: Path) -> None:
    edit(layout, {"nodes.hospital_a.port": "27x301"})
    rules = layout.parent.parent / "rules" / "priors.yaml"
    rules.write_text(rules.read_text().replace("lookback: 5y", "lookback: 5 yrs", 1))
    with pytest.raises(ConfigError) as raised:
        config.load(layout)
    paths = [problem.path for problem in raised.value.problems]
    assert paths == ["nodes.hospital_a.port", "rules[0].select.lookback"]


def test_one_file_errors_reported_together(layout: Path) -> None:
    routes = layout.parent.parent / "routes" / "orders.yaml"
    routes.write_text(
        "routes:\n"
        "  - name: broken\n"
        "    sources: hospital_a\n"
        "    destination: local_pacs\n"
        "  - name: typos\n"
        "    sources: [hospital_c]\n"
        "    destination: local_pacs\n"
        "    rules: [nonexistent-rule]\n"
    )
    with pytest.raises(ConfigError) as raised:
        config.load(layout)
    problems = [(problem.path, problem.message) for problem in raised.value.problems]
    assert problems == [
        ("routes[0].sources", "input should be a valid list (value 'hospital_a')"),
        ("routes[1].rules[0]", "unknown rule 'nonexistent-rule'"),
        ("routes[1].sources[0]", "unknown node 'hospital_c'"),
    ]
