"""`fdqr demo`: the prefetch path end to end on loopback, with real peers.

Starts three Orthanc servers (two remote hospitals and the local PACS), loads
them with one patient's priors and the traps of a real network, starts
`fdqr run` with the shipped routes, rules and identity table, sends one HL7
order, waits for the job, and prints what was found, chosen and stored, and
the audit records the engine wrote.
"""

from __future__ import annotations

import datetime as dt
import io
import shutil
import time
from pathlib import Path

import click
import hl7.client
from pydicom import dcmread

from engine import audit
from engine.clitools import format_table
from engine.jobs.store import JobRecord, Store
from engine.testing.scenario import Scenario, order_message, prefetch_scenario
from engine.testing.sites import REPOSITORY, EngineProcess, Network, wait_for_newest_job

JOB_TIMEOUT_SECONDS = 120.0


def run_demo(keep: bool = False) -> int:
    folder = REPOSITORY / "var" / "demo"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    scenario = prefetch_scenario(dt.date.today())
    network = Network(folder)
    engine: EngineProcess | None = None
    succeeded = False
    try:
        click.echo("Starting three Orthanc servers on loopback ...")
        network.start()
        loaded = network.load(scenario)
        _print_sites(network, scenario, loaded)

        config = network.write_engine_config(folder / "engine" / "engine.yaml")
        engine = EngineProcess(config, network.ports.mllp, folder / "engine.log")
        click.echo(f"Starting the engine: fdqr run --config {config.relative_to(REPOSITORY)}")
        engine.start()

        started = time.monotonic()
        control_id = f"DEMO{dt.datetime.now():%H%M%S}"
        ack = _send_order(network, scenario, control_id)
        click.echo(f"ACK: {ack}")
        job = wait_for_newest_job(folder / "engine" / "fdqr.sqlite", JOB_TIMEOUT_SECONDS, 0.25)
        click.echo(
            f"\nJob {job.id}: {job.state} after {time.monotonic() - started:.1f} s: {job.summary}"
        )
        _print_decisions(folder / "engine" / "fdqr.sqlite", job)
        succeeded = _print_destination(network, scenario) and job.state == "done"
    except Exception as error:
        click.echo(f"demo failed: {error}", err=True)
    finally:
        if engine is not None:
            status = engine.stop()
            if status != 0:
                click.echo(f"fdqr run exited with status {status}", err=True)
                succeeded = False
        network.stop()
    if succeeded:
        succeeded = _print_audit(folder / "engine" / "audit.log", scenario)

    if succeeded:
        click.echo(
            "\nDemo passed: every expected prior is at the local PACS under the local identity."
        )
    else:
        click.echo(f"\nDemo FAILED; logs are in {folder}", err=True)
    if succeeded and not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return 0 if succeeded else 1


def _print_sites(network: Network, scenario: Scenario, loaded: int) -> None:
    rows = [("SITE", "AE TITLE", "ADDRESS", "PATIENT IDS", "STUDIES", "INSTANCES")]
    for name, server in network.sites.items():
        placements = scenario.at(name)
        ids = sorted({f"{p.patient.id}^^^{p.patient.issuer}" for p in placements})
        rows.append(
            (
                name,
                server.ae_title,
                f"{server.host}:{server.dicom_port}",
                ", ".join(ids),
                str(len(placements)),
                str(sum(p.study.instance_count for p in placements)),
            )
        )
    click.echo(format_table(rows, indent="  "))
    click.echo(
        f"  {loaded} instances loaded from pydicom's test images (CT, MR, MR JPEG 2000, MR RLE)"
    )


def _send_order(network: Network, scenario: Scenario, control_id: str) -> str:
    patient = scenario.local_patient
    message = order_message(patient, control_id, f"ACC-{control_id}", dt.datetime.now())
    click.echo(
        f"\nSending ORM^O01 {control_id}: new CT chest order for {patient.id}^^^{patient.issuer}"
    )
    with hl7.client.MLLPClient("127.0.0.1", network.ports.mllp) as client:
        raw = client.send_message(message)
    segments = raw.strip(b"\x0b\x1c\r").split(b"\r")
    msa = next((segment for segment in segments if segment.startswith(b"MSA")), b"")
    fields = [*msa.decode(errors="replace").split("|"), "?", "?"]
    return f"MSA-1 {fields[1]}, MSA-2 {fields[2]}"


def _print_decisions(store_path: Path, job: JobRecord) -> None:
    store = Store(store_path)
    try:
        studies = store.studies(job.id)
        events = store.events(job.id)
    finally:
        store.close()
    click.echo("\nStudies found at the sources, and the rule's decision:")
    rows = [
        ("SOURCE", "PATIENT", "DATE", "MOD", "DESCRIPTION", "DECISION", "FOUND", "STORED", "REASON")
    ]
    for study in sorted(studies, key=lambda s: (s.source, s.study_date or ""), reverse=False):
        rows.append(
            (
                study.source,
                study.remote_patient.value,
                study.study_date or "-",
                study.modalities,
                study.description[:28],
                study.state.value,
                "-" if study.found is None else str(study.found),
                str(study.stored),
                study.reason,
            )
        )
    click.echo(format_table(rows, indent="  "))
    click.echo("\nJob log:")
    for _, text in events:
        click.echo(f"  {text}")


def _print_destination(network: Network, scenario: Scenario) -> bool:
    """Print the local PACS content and check it against the scenario; return True if it matches."""
    local = network.sites["local_pacs"]
    by_uid = {p.study.uid: p.study for p in scenario.placements}
    rows = [
        ("STUDY", "DATE", "INSTANCES", "PatientID", "IssuerOfPatientID", "OtherPatientIDsSequence")
    ]
    present: dict[str, int] = {}
    identities_ok = True
    for study in local.studies():
        uid = study["MainDicomTags"]["StudyInstanceUID"]
        present[uid] = len(study["InstanceIds"])
        sample = dcmread(
            io.BytesIO(local.instance_file(study["InstanceIds"][0])), stop_before_pixels=True
        )
        others = ", ".join(
            f"{item.PatientID}^^^{item.get('IssuerOfPatientID', '')}"
            for item in sample.get("OtherPatientIDsSequence", [])
        )
        spec = by_uid.get(uid)
        rows.append(
            (
                spec.key if spec else uid,
                study["MainDicomTags"].get("StudyDate", ""),
                str(present[uid]),
                str(sample.PatientID),
                str(sample.get("IssuerOfPatientID", "")),
                others or "-",
            )
        )
        identities_ok &= sample.PatientID == scenario.local_patient.id
    click.echo("\nAt the local PACS now:")
    click.echo(format_table(rows, indent="  "))

    expected = {scenario.study(key).uid: scenario.study(key) for key in scenario.expected_moved}
    complete = all(present.get(uid) == spec.instance_count for uid, spec in expected.items())
    leaked = [key for key in scenario.must_not_move if scenario.study(key).uid in present]
    if leaked:
        click.echo(f"  studies that must not move were found: {', '.join(leaked)}", err=True)
    if not complete:
        click.echo("  some expected studies are missing or incomplete", err=True)
    return identities_ok and complete and not leaked


def _print_audit(path: Path, scenario: Scenario) -> bool:
    """Print the audit records; return True if each moved study has a successful transfer record."""
    try:
        messages = audit.read_file(path)
    except (OSError, ValueError) as error:
        click.echo(f"  the audit file {path} cannot be read: {error}", err=True)
        return False
    rows = [("EVENT", "OUTCOME", "PARTICIPANTS", "OBJECTS")]
    transferred: set[str] = set()
    for message in messages:
        event = message.find("EventIdentification")
        event_id = event.find("EventID") if event is not None else None
        if event is None or event_id is None:
            continue
        outcome = event.attrib.get("EventOutcomeIndicator", "")
        objects = [
            item.attrib["ParticipantObjectID"]
            for item in message.findall("ParticipantObjectIdentification")
        ]
        if event_id.attrib["csd-code"] == audit.INSTANCES_TRANSFERRED.code and outcome == "0":
            transferred.update(objects)
        event_type = event.find("EventTypeCode")
        name = event_id.attrib["originalText"]
        if event_type is not None:
            name += f": {event_type.attrib['originalText']}"
        users = [audit.participant_name(item) for item in message.findall("ActiveParticipant")]
        rows.append((name, outcome, ", ".join(users), ", ".join(objects) or "-"))
    click.echo(f"\nAudit records in {path.relative_to(REPOSITORY)}:")
    click.echo(format_table(rows, indent="  "))

    missing = [key for key in scenario.expected_moved if scenario.study(key).uid not in transferred]
    if missing:
        click.echo(f"  no transfer record for: {', '.join(missing)}", err=True)
    return not missing
