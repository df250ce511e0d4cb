"""The identity and coercion sections of conf/engine.yaml: errors name file, line, path and value."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from engine import config
from engine.configfile import ConfigError

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    for folder in ("conf", "routes", "rules"):
        shutil.copytree(REPOSITORY / folder, tmp_path / folder)
    return tmp_path / "conf" / "engine.yaml"


def write(path: Path, section: str, value: object) -> None:
    settings = yaml.safe_load(path.read_text())
    settings[section].update(value)  # type: ignore[arg-type]
    path.write_text(yaml.safe_dump(settings, sort_keys=False))


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        config.load(path)
    return [str(problem) for problem in raised.value.problems]


def line_of(path: Path, text: str) -> int:
    return next(n for n, row in enumerate(path.read_text().splitlines(), 1) if text in row)


def test_shipped_sections_valid(layout: Path) -> None:
    loaded = config.load(layout)
    assert loaded.settings.identity.default_chain == ["table", "learned"]
    assert loaded.coercion_profiles == {}


def test_chain_names_unknown_source(layout: Path) -> None:
    write(layout, "identity", {"chains": {"HOSP_A": ["table", "pix_typo"]}})
    [message] = problems(layout)
    line = line_of(layout, "pix_typo")
    assert message == (
        f"{layout}:{line}: identity.chains.HOSP_A[1]: unknown identity source 'pix_typo'"
        " (table, learned, shared)"
    )


def test_pixm_needs_fhir_systems(layout: Path) -> None:
    write(
        layout,
        "identity",
        {
            "sources": {"mpi": {"type": "pixm", "base_url": "http://127.0.0.1:9/fhir"}},
            "chains": {"HOSP_A": ["mpi"]},
        },
    )
    messages = problems(layout)
    assert len(messages) == 2
    assert (
        "identity.chains.HOSP_A[0]: pixm source 'mpi' needs a FHIR system for domain LOCAL"
        in messages[0]
    )


def test_source_settings_checked(layout: Path) -> None:
    write(layout, "identity", {"sources": {"pix": {"type": "pix"}}})
    [message] = problems(layout)
    assert message.endswith(
        "identity.sources.pix: a pix source needs endpoint (e.g. tcp:host=H:port=P)"
    )
    write(layout, "identity", {"sources": {"table": {"type": "pixm", "base_url": "http://h/"}}})
    [message] = problems(layout)
    assert message.endswith("identity.sources: source name reserved for a built-in source: table")


def test_coercion_profile_settings_checked(layout: Path) -> None:
    write(layout, "coercion", {"profiles": {"remap": {"study_uid": "remap"}}})
    [message] = problems(layout)
    line = line_of(layout, "study_uid: remap")
    assert message == (
        f"{layout}:{line}: coercion.profiles.remap: study_uid remap needs uid_root,"
        " a UID root your site owns"
    )


def test_coercion_references_checked(layout: Path) -> None:
    write(
        layout,
        "coercion",
        {
            "profiles": {"ok": {"issuer_qualifiers": True}},
            "destinations": {"pacs_typo": "ok", "local_pacs": "missing"},
        },
    )
    messages = problems(layout)
    assert len(messages) == 3
    assert any("coercion.destinations.pacs_typo: unknown node 'pacs_typo'" in m for m in messages)
    assert any("coercion.destinations.local_pacs: unknown profile 'missing'" in m for m in messages)
    assert any(
        "coercion.profiles.ok.issuer_qualifiers: the local domain LOCAL has no universal_id" in m
        for m in messages
    )


def test_coercion_profile_built(layout: Path) -> None:
    write(layout, "identity", {"domains": {"LOCAL": {"universal_id": "1.2.3.1"}}})
    write(
        layout,
        "coercion",
        {
            "profiles": {
                "p": {
                    "issuer_qualifiers": True,
                    "accession": "prefix",
                    "site_codes": {"HOSP_A": "HA-"},
                }
            },
            "destinations": {"local_pacs": "p"},
        },
    )
    profile = config.load(layout).coercion_profiles["local_pacs"]
    assert profile.accession == "prefix"
    assert profile.site_code("HOSP_A") == "HA-"
    assert profile.qualifier("LOCAL") is not None
    assert profile.modifying_system == "FDQR"


def test_check_strictness_off_unquoted(layout: Path) -> None:
    layout.write_text(layout.read_text().replace("strictness: normalised", "strictness: off"))
    assert config.load(layout).settings.identity.check.strictness == "off"
    layout.write_text(layout.read_text().replace("strictness: off", "strictness: yes"))
    [found] = problems(layout)
    assert "identity.check.strictness: input should be 'exact', 'normalised' or 'off'" in found
