"""The `federation` section of conf/engine.yaml: validation and the errors it reports."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine import config
from engine.configfile import ConfigError
from engine.federation.settings import site_issuer

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    for folder in ("conf", "routes", "rules"):
        shutil.copytree(REPOSITORY / folder, tmp_path / folder)
    return tmp_path / "conf" / "engine.yaml"


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        config.load(path)
    return [str(problem) for problem in raised.value.problems]


def test_shipped_federation_valid(layout: Path) -> None:
    settings = config.load(layout).settings
    federation = settings.federation
    assert federation.enabled
    assert sorted(federation.sites) == ["hospital_a", "hospital_b", "local_pacs"]
    assert site_issuer(settings, "local_pacs") == "LOCAL"
    assert site_issuer(settings, "hospital_a") == "HOSP_A"
    assert federation.callers["READING_WS1"].move_destinations == ["READING_WS1"]


def test_federation_unknown_site_and_destination(layout: Path) -> None:
    text = layout.read_text()
    text = text.replace(
        "    hospital_b:\n      timeout_seconds: 20", "    hospital_c:\n      timeout_seconds: 20"
    )
    text = text.replace("move_destinations: [READING_WS1]", "move_destinations: [READING_WS2]")
    layout.write_text(text)
    found = problems(layout)
    assert len(found) == 2
    lines = text.splitlines()
    # A mapping's line is the line of its first key.
    site_line = lines.index("    hospital_c:") + 2
    assert found[0].startswith(f"{layout}:{site_line}: federation.sites.hospital_c: unknown node")
    destination_line = next(i for i, line in enumerate(lines, 1) if "READING_WS2]" in line)
    assert found[1] == (
        f"{layout}:{destination_line}: federation.callers.READING_WS1.move_destinations[0]: "
        "unknown move destination 'READING_WS2' "
        "(define it under federation.move_destinations; known: READING_WS1)"
    )


def test_federation_site_without_issuer(layout: Path) -> None:
    text = layout.read_text().replace(
        "      issuer: LOCAL\n      timeout_seconds: 20", "      timeout_seconds: 20"
    )
    layout.write_text(text)
    [found] = problems(layout)
    assert "federation.sites.local_pacs: site 'local_pacs' has no issuer" in found


def test_federation_invalid_values(layout: Path) -> None:
    text = (
        layout.read_text()
        .replace("character_set: ISO_IR 192", "character_set: LATIN-9")
        .replace(
            "READING_WS1: {host: 127.0.0.1, port: 11113}", "READING_WS1: {host: 127.0.0.1, port: 0}"
        )
        .replace("queries_without_patient_id: true", "queries_without_patient_id: sometimes")
    )
    layout.write_text(text)
    found = problems(layout)
    assert len(found) == 3
    assert any(
        "federation.character_set: unknown Specific Character Set term 'LATIN-9'" in p
        for p in found
    )
    assert any(
        "federation.move_destinations.READING_WS1.port:" in p and "(value 0)" in p for p in found
    )
    assert any("federation.sites.local_pacs.queries_without_patient_id:" in p for p in found)


def test_federation_disabled_needs_nothing(layout: Path) -> None:
    text = layout.read_text().replace("  enabled: true", "  enabled: false")
    text = text.replace("move_destinations: [READING_WS1]", "move_destinations: [NOWHERE]")
    layout.write_text(text)
    assert not config.load(layout).settings.federation.enabled


def test_federation_site_issuer_differs_from_node(layout: Path) -> None:
    text = layout.read_text().replace(
        "    hospital_b:\n      timeout_seconds: 20",
        "    hospital_b:\n      issuer: HOSP_A\n      timeout_seconds: 20",
    )
    layout.write_text(text)
    [found] = problems(layout)
    assert "federation.sites.hospital_b.issuer: issuer 'HOSP_A' differs from" in found
    assert "nodes.hospital_b.issuer 'HOSP_B'" in found


@pytest.mark.parametrize(
    ("issuer", "message"),
    [
        ("HOSP_A", "issuer 'HOSP_A' is also the issuer of site 'hospital_a'"),
        ("LOCALX", "unknown domain 'LOCALX'"),
    ],
)
def test_local_pacs_site_issuer_checked(layout: Path, issuer: str, message: str) -> None:
    text = layout.read_text().replace("      issuer: LOCAL\n", f"      issuer: {issuer}\n")
    layout.write_text(text)
    [found] = problems(layout)
    assert f"federation.sites.local_pacs.issuer: {message}" in found
