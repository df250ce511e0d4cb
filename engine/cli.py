"""The `fdqr` command."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import click

from engine.clitools import (
    ROW_COUNT,
    ROW_ID,
    config_option,
    format_table,
    job_or_exit,
    load_or_exit,
    load_settings_or_exit,
    open_store,
)
from engine.hl7.cli import messages_group
from engine.identity import records
from engine.identity.cli import identity_group
from engine.jobs.store import JobRecord, JobState, Store
from engine.logsetup import setup_logging
from engine.model import PatientIdentifier
from engine.rules.cli import rules_group
from engine.worklist.cli import worklist_group


@click.group()
@config_option
def main(config_path: Path) -> None:
    """fdqr: federated DICOM Query/Retrieve and prior-study prefetch engine."""


main.add_command(messages_group)


@main.command()
@config_option
@click.option(
    "--log-level", default="INFO", show_default=True, help="DEBUG, INFO, WARNING or ERROR."
)
def run(config_path: Path, log_level: str) -> None:
    """Run the engine until SIGINT or SIGTERM.

    It runs the MLLP listener, the Storage SCP (with the federated Q/R SCP when
    federation.enabled), the job worker, the worklist poller and the HTTP listener.
    """
    setup_logging(log_level)
    config = load_or_exit(config_path)
    from engine.service import run as run_engine

    raise SystemExit(run_engine(config))


@main.group(name="config")
@config_option
def config_group(config_path: Path) -> None:
    """Check the configuration."""


@config_group.command(name="check")
@config_option
def config_check(config_path: Path) -> None:
    """Validate conf/, routes/ and rules/ and report every problem at once."""
    config = load_or_exit(config_path)
    rule_set = config.rule_set
    click.echo(
        f"{config_path}: valid ({len(config.settings.nodes)} nodes, {len(rule_set.routes)} routes,"
        f" {len(rule_set.rules)} rules, {len(config.identity_table)} cross-referenced patients)"
    )


@main.group(name="jobs", invoke_without_command=True)
@config_option
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice([s.value for s in JobState]),
    help="Only jobs in this state; repeat it for several states.",
)
@click.option(
    "--limit",
    default=50,
    type=ROW_COUNT,
    show_default=True,
    help="Number of most recent jobs shown.",
)
@click.pass_context
def jobs_group(ctx: click.Context, config_path: Path, states: Sequence[str], limit: int) -> None:
    """List jobs with their state and per-study counts."""
    ctx.obj = config_path
    if ctx.invoked_subcommand is not None:
        return
    zone = load_settings_or_exit(config_path).zone
    store = open_store(config_path)
    jobs = store.list_jobs(limit, [JobState(state) for state in states])
    rows = [
        (
            "JOB",
            "STATE",
            "CREATED",
            "NOT BEFORE",
            "PATIENT",
            "RULE",
            "STUDIES",
            "FOUND",
            "RECEIVED",
            "STORED",
            "SUMMARY",
        )
    ]
    for job in jobs:
        studies = [study for study in store.studies(job.id) if study.selected]
        rows.append(
            (
                str(job.id),
                job.state.value,
                zone.shown(job.created_at),
                zone.shown(job.not_before) if job.state.pending else "",
                patient_label(store, job.patient),
                job.rule,
                str(len(studies)),
                str(sum(study.found or 0 for study in studies)),
                str(sum(study.received for study in studies)),
                str(sum(study.stored for study in studies)),
                job.summary,
            )
        )
    click.echo(format_table(rows))


def patient_label(store: Store, patient: PatientIdentifier) -> str:
    """Return a job's patient ID, with the ID it lives on as when a merge retired it."""
    active, path = records.active_patient(store, patient)
    return f"{patient} (merged into {active})" if path else str(patient)


@jobs_group.command(name="show")
@click.argument("job_id", type=ROW_ID)
@config_option
def jobs_show(config_path: Path, job_id: int) -> None:
    """Show one job: its studies with the rule's decisions, and its event log."""
    settings = load_settings_or_exit(config_path)
    zone = settings.zone
    store = open_store(config_path)
    job = job_or_exit(store, job_id)
    summary = f": {job.summary}" if job.summary else ""
    attempts = f"{job.attempts} of {settings.jobs.max_attempts} attempts used"
    click.echo(f"job {job.id}: {job.state}, {attempts}{summary}")
    click.echo(f"  patient {patient_label(store, job.patient)}, route {job.route}, rule {job.rule}")
    click.echo(f"  sources {', '.join(job.sources)}, destination {job.destination}")
    order = job.order
    click.echo(f"  {_job_origin(store, job)}")
    click.echo(
        f"  order: placer {order.placer_order_number or '-'},"
        f" filler {order.filler_order_number or '-'},"
        f" accession {order.accession_number or '-'},"
        f" modality {order.ordered_modality or '-'}, procedure {order.procedure_code or '-'}"
    )
    scheduled = zone.shown(order.scheduled_time) if order.scheduled_time else "-"
    click.echo(
        f"  body part {', '.join(order.body_parts) or '-'}, scheduled {scheduled},"
        f" not before {zone.shown(job.not_before)}"
    )
    rows = [
        (
            "SOURCE",
            "STUDY DATE",
            "MODALITIES",
            "STATE",
            "FOUND",
            "RECEIVED",
            "STORED",
            "STUDY UID",
            "REASON",
        )
    ]
    studies = store.studies(job.id)
    for study in studies:
        rows.append(
            (
                study.source,
                study.study_date or "-",
                study.modalities,
                study.state.value,
                "-" if study.found is None else str(study.found),
                str(study.received),
                str(study.stored),
                study.study_instance_uid,
                study.reason,
            )
        )
    if studies:
        click.echo(format_table(rows, indent="  "))
    else:
        click.echo("  studies: none found" if job.state.finished else "  studies: none found yet")
    click.echo("  events:")
    for at, text in store.events(job.id):
        click.echo(f"    {zone.shown(at, 'milliseconds')} {text}")


def _job_origin(store: Store, job: JobRecord) -> str:
    """Return the stored message (an HL7 message or a worklist step) that created a job."""
    if job.message_id is None:
        return "from no stored message"
    message = store.get_message(job.message_id)
    if message is None:
        return f"from message {job.message_id} (deleted: store.retention_days)"
    origin = message.origin
    return (
        f"from message {message.id}: {origin.message_type} {origin.control_id}"
        f" from {origin.sending_application}/{origin.sending_facility}"
        " (fdqr messages show)"
    )


@jobs_group.command(name="cancel")
@click.argument("job_id", type=ROW_ID)
@click.option(
    "--reason",
    default="cancelled by an operator",
    show_default=True,
    help="Text recorded in the job's summary and event log.",
)
@config_option
def jobs_cancel(config_path: Path, job_id: int, reason: str) -> None:
    """Cancel a pending job, or stop a running one: its retrieve in progress stops within
    seconds, and its objects waiting in the spool are deleted unsent."""
    store = open_store(config_path)
    job = job_or_exit(store, job_id)
    if job.state.finished and job.state != JobState.QUARANTINED:
        click.echo(f"job {job_id} is {job.state.value} already; nothing to cancel", err=True)
        raise SystemExit(1)
    click.echo(store.cancel_job(job_id, reason, dt.datetime.now(dt.UTC)))


@jobs_group.command(name="requeue")
@click.argument("job_id", type=ROW_ID)
@click.option("--force", is_flag=True, help="Queue it even though it or its order was cancelled.")
@config_option
def jobs_requeue(config_path: Path, job_id: int, force: bool) -> None:
    """Queue a finished job for a new attempt now.

    A running engine claims it within jobs.poll_seconds.
    """
    store = open_store(config_path)
    job = job_or_exit(store, job_id)
    if not force and job.id in {
        cancelled.id for cancelled in store.cancelled_jobs(job.patient, job.order)
    }:
        # A cancelled job names why in its summary: an operator, or its order's cancel.
        reason = (
            f"it was cancelled ({job.summary})"
            if job.state == JobState.CANCELLED
            else f"its order was cancelled after it ended ({job.state}: {job.summary})"
        )
        click.echo(
            f"job {job_id} was not queued: {reason}. Queue it anyway with --force.", err=True
        )
        raise SystemExit(1)
    if not store.requeue_job(job_id, "queued again by an operator", dt.datetime.now(dt.UTC)):
        click.echo(
            f"job {job_id} is {job.state.value}; only a finished job can be queued again",
            err=True,
        )
        raise SystemExit(1)
    click.echo(f"job {job_id} queued (was {job.state.value})")


@main.command()
@click.option(
    "--keep", is_flag=True, help="Leave the demo folder var/demo in place for inspection."
)
def demo(keep: bool) -> None:
    """Run the prefetch demo: three Orthanc servers, the engine, and one HL7 order."""
    from engine.demo import run_demo

    raise SystemExit(run_demo(keep=keep))


main.add_command(identity_group)
main.add_command(worklist_group)
main.add_command(rules_group)

if __name__ == "__main__":
    main()
