"""`fdqr identity`: learned cross-references, merges, and releasing quarantined jobs."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from engine.clitools import (
    ROW_COUNT,
    ROW_ID,
    config_option,
    format_table,
    job_or_exit,
    load_settings_or_exit,
    open_store,
)
from engine.identity import records
from engine.jobs.store import JobState
from engine.model import PatientIdentifier


@click.group(name="identity")
@config_option
@click.pass_context
def identity_group(ctx: click.Context, config_path: Path) -> None:
    """Inspect identity records and release quarantined jobs."""
    ctx.obj = config_path


@identity_group.command(name="learned")
@click.option(
    "--limit", default=200, type=ROW_COUNT, show_default=True, help="Number of most recent entries."
)
@config_option
def learned(config_path: Path, limit: int) -> None:
    """List cross-references learned from ADT messages, most recent first."""
    zone = load_settings_or_exit(config_path).zone
    store = open_store(config_path)
    rows = [("LOCAL", "REMOTE", "LEARNED AT", "MESSAGE")]
    for item in records.learned_references(store, limit):
        learned_at = zone.shown(dt.datetime.fromisoformat(item.learned_at))
        rows.append((str(item.local), str(item.remote), learned_at, item.message_control_id))
    click.echo(format_table(rows))


@identity_group.command(name="merges")
@click.option(
    "--limit", default=200, type=ROW_COUNT, show_default=True, help="Number of most recent merges."
)
@config_option
def merges(config_path: Path, limit: int) -> None:
    """List ADT^A40 merges: each retired ID and the ID it lives on as."""
    zone = load_settings_or_exit(config_path).zone
    store = open_store(config_path)
    rows = [("RETIRED", "SURVIVING", "MERGED AT", "MESSAGE")]
    for item in records.merges(store, limit):
        merged_at = zone.shown(dt.datetime.fromisoformat(item.merged_at))
        rows.append((str(item.retired), str(item.surviving), merged_at, item.message_control_id))
    click.echo(format_table(rows))


@identity_group.command(name="patient")
@click.argument("patient_id")
@click.option(
    "--unredacted", is_flag=True, help="Show the name and birth date, which are hidden otherwise."
)
@config_option
def patient(config_path: Path, patient_id: str, unredacted: bool) -> None:
    """Show what the engine holds on a local patient: the ADT record, merges and
    learned identifiers. PATIENT_ID is the local ID, without its issuer."""
    settings = load_settings_or_exit(config_path)
    if "^" in patient_id:
        click.echo(
            f"'{patient_id}' is not a local patient ID: give the ID alone, without ^^^ and"
            f" its issuer ({settings.local_patient.issuer})",
            err=True,
        )
        raise SystemExit(2)
    zone = settings.zone
    store = open_store(config_path)
    local = PatientIdentifier(patient_id, settings.local_patient.issuer)
    click.echo(f"patient {local}")

    record = records.patient_record(store, local)
    if record is None:
        click.echo("  record: none (no ADT message registered this patient)")
    else:
        click.echo(
            f"  record: {_record_text(record, unredacted)}; updated"
            f" {zone.shown(dt.datetime.fromisoformat(record.updated_at))} by message"
            f" {record.message_control_id}"
        )

    active, path = records.active_patient(store, local)
    if path:
        chain = " -> ".join(str(item) for item in [local, *path])
        click.echo(f"  merged: {chain}; orders of this ID run as {active}")
    retired = records.retired_into(store, local)
    if retired:
        click.echo(f"  merged into it: {', '.join(str(item) for item in retired)}")

    learned_ids = records.learned_for(store, local)
    if not learned_ids:
        click.echo("  learned identifiers: none")
    for item in learned_ids:
        learned_at = zone.shown(dt.datetime.fromisoformat(item.learned_at))
        click.echo(
            f"  learned {item.remote} at {learned_at} from message {item.message_control_id}"
        )


def _record_text(record: records.PatientRecord, unredacted: bool) -> str:
    """Return the demographics of a record, with the name and birth date as *** unless asked."""
    demographics = record.demographics
    name = demographics.name
    birth_date = demographics.birth_date
    if not unredacted:
        name = "***" if name else ""
        birth_date = "***" if birth_date else ""
    return f"name {name or '-'}, birth date {birth_date or '-'}, sex {demographics.sex or '-'}"


@identity_group.command(name="release")
@click.argument("job_id", type=ROW_ID)
@click.option(
    "--accept",
    is_flag=True,
    help="Accept the remote patients of the held studies as the job's patient, so the"
    " demographics check passes for them; without it the check runs again.",
)
@config_option
def release(config_path: Path, job_id: int, accept: bool) -> None:
    """Queue a quarantined job for a new attempt (the running engine picks it up)."""
    store = open_store(config_path)
    job = job_or_exit(store, job_id)
    if job.state != JobState.QUARANTINED:
        click.echo(f"job {job_id} is {job.state}, not quarantined", err=True)
        raise SystemExit(1)
    now = dt.datetime.now(dt.UTC)
    held = [study.remote_patient for study in store.studies(job_id) if study.state == "quarantined"]
    if accept:
        records.accept_remote_patients(store, job_id, sorted(set(held), key=str), now)
    remotes = ", ".join(sorted({str(remote) for remote in held})) or "none"
    note = (
        f"released from quarantine by an operator, remote patients accepted: {remotes}"
        if accept
        else "released from quarantine by an operator; the demographics check runs again"
    )
    store.requeue_job(job_id, note, now)
    click.echo(f"job {job_id} queued: {note}")
