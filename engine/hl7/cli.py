"""`fdqr messages`: list, show and replay the HL7 messages in the store."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from engine import config as config_module
from engine.clitools import (
    ROW_COUNT,
    ROW_ID,
    config_option,
    format_table,
    load_or_exit,
    load_settings_or_exit,
    open_store,
)
from engine.hl7.ack import split_acks
from engine.hl7.intake import Interpreter, ignore_reason
from engine.hl7.message import CharsetDefaults, Delimiters, HL7Error, Message, parse
from engine.hl7.wiring import engine_planner, identifier_policy
from engine.jobs.store import JobRecord, JobState, MessageRecord
from engine.rules.timing import LocalZone
from engine.runlock import holder_of, lock_file_of

# Fields that carry names, birth dates, addresses, phone numbers or national
# ids, by segment: `messages show` replaces them unless asked not to.
REDACTED_FIELDS = {
    # PID-18 is the patient account number; NK1-33 the next of kin's identifiers.
    "PID": (5, 6, 7, 9, 11, 13, 14, 18, 19, 20),
    "NK1": (2, 4, 5, 6, 16, 33),
    "MRG": (7,),
    "GT1": (3, 5, 6, 7, 8, 12),
    "IN1": (16, 18, 19),
    "IN2": (2,),
}
REDACTED = "***"
# Patient identifier lists whose repetitions may be national or other personal ids.
IDENTIFIER_LIST_FIELDS = {"PID": (2, 3, 4), "MRG": (1, 2, 3, 4)}
# Identifier types (HL7 Table 0203) of ids a person carries outside the hospital:
# social security, national unique, national health plan, passport, driver's
# licence, health card, jurisdictional health, Medicare, Medicaid, birth
# certificate. NNxxx (a country's national person id) is matched by its prefix.
PERSONAL_ID_TYPES = frozenset({"SS", "NI", "NH", "PPN", "DL", "HC", "JHN", "MC", "MA", "BCT"})


@click.group(name="messages")
@config_option
def messages_group(config_path: Path) -> None:
    """List, show and replay stored HL7 messages."""


@messages_group.command(name="list")
@config_option
@click.option(
    "--limit", default=50, type=ROW_COUNT, show_default=True, help="Number of most recent messages."
)
@click.option("--type", "message_type", help="Only this message type, e.g. ORM^O01.")
@click.option("--sender", help="Only this sending application (MSH-3).")
@click.option("--control-id", help="Only this message control id (MSH-10).")
def messages_list(
    config_path: Path,
    limit: int,
    message_type: str | None,
    sender: str | None,
    control_id: str | None,
) -> None:
    """List stored messages, most recent first, with their ACK and outcome."""
    zone = load_settings_or_exit(config_path).zone
    store = open_store(config_path)
    messages = store.list_messages(
        limit, message_type=message_type, sending_application=sender, control_id=control_id
    )
    rows = [("ID", "RECEIVED", "TYPE", "CONTROL ID", "SENDER", "PEER", "ACK", "JOBS", "OUTCOME")]
    for message in messages:
        origin = message.origin
        rows.append(
            (
                str(message.id),
                zone.shown(message.received_at),
                origin.message_type,
                origin.control_id,
                f"{origin.sending_application}/{origin.sending_facility}",
                message.peer,
                ack_codes(message.ack),
                str(len(store.message_jobs(message.id))),
                message.outcome,
            )
        )

    click.echo(format_table(rows))


@messages_group.command(name="show")
@config_option
@click.argument("message_id", type=ROW_ID)
@click.option(
    "--unredacted",
    is_flag=True,
    help="Show names, birth dates, addresses, phone numbers and other domains' ids as received.",
)
def messages_show(config_path: Path, message_id: int, unredacted: bool) -> None:
    """Show one message: header, outcome, ACK, jobs, replays and content."""
    settings = load_settings_or_exit(config_path)
    store = open_store(config_path)
    message = store.get_message(message_id)
    content = store.message_content(message_id)
    if message is None or content is None:
        click.echo(f"message {message_id} not found", err=True)
        raise SystemExit(1)

    zone = settings.zone
    _echo_header(message, zone)
    for ack in split_acks(message.ack):
        click.echo(f"  ack: {_segments(ack.decode('utf-8', errors='replace'))[1]}")
    _echo_jobs(store.message_jobs(message_id))
    for replay in store.replays(message_id):
        jobs = ", ".join(str(job_id) for job_id in replay.job_ids) or "none"
        click.echo(
            f"  replay {replay.id} at {zone.shown(replay.replayed_at)}: {replay.outcome}"
            f" (jobs {jobs})"
        )

    click.echo(_content_heading(unredacted))
    click.echo(render(content, settings.mllp.charsets(), unredacted, known_authorities(settings)))


@messages_group.command(name="replay")
@config_option
@click.argument("message_id", type=ROW_ID)
@click.option("--dry-run", is_flag=True, help="Show what the replay would do; change nothing.")
@click.option(
    "--force",
    is_flag=True,
    help="Replay even if jobs of the message have not finished yet, or its order was cancelled.",
)
def messages_replay(config_path: Path, message_id: int, dry_run: bool, force: bool) -> None:
    """Process a stored message again with the current routes and rules.

    A replay is never taken for a duplicate: it creates the jobs the current
    rules ask for, even if the message created jobs before. The message's own
    earlier jobs do not suppress them; a job of another message for the same
    order still does. A running engine picks them up at its next poll.
    """
    config = load_or_exit(config_path)
    store = open_store(config_path)
    message = store.get_message(message_id)
    content = store.message_content(message_id)
    if message is None or content is None:
        click.echo(f"message {message_id} not found", err=True)
        raise SystemExit(1)

    unfinished = [job for job in store.message_jobs(message_id) if not job.state.finished]
    if unfinished and not force and not dry_run:
        listed = ", ".join(f"{job.id} ({job.state})" for job in unfinished)
        click.echo(
            f"message {message_id} has unfinished jobs {listed}; a replay would run the same"
            " work twice. Wait for them, or replay anyway with --force.",
            err=True,
        )
        raise SystemExit(1)

    now = dt.datetime.now(dt.UTC)
    interpreter = interpreter_for(config, now, replay=True)
    try:
        plan = interpreter.plan(interpreter.parse(content))
    except HL7Error as error:
        click.echo(
            f"message {message_id} cannot be processed with the current configuration:"
            f" {error.text} (HL7 error {error.code.value}); nothing was changed",
            err=True,
        )
        raise SystemExit(1) from None

    # Jobs this very message cancelled (an XO replaces its order's jobs) do not count.
    own_cancel = f"by message {message.origin.control_id}"
    cancelled = {
        earlier.id: earlier
        for planned in plan.jobs
        for earlier in store.cancelled_jobs(planned.patient, planned.order)
        if not earlier.summary.endswith(own_cancel)
    }
    for earlier in sorted(cancelled.values(), key=lambda record: record.id):
        # A cancelled job names why in its summary: an operator, or its order's cancel.
        description = (
            f"job {earlier.id} of this order was cancelled ({earlier.summary})"
            if earlier.state == JobState.CANCELLED
            else f"the order of job {earlier.id} was cancelled after it ended"
            f" ({earlier.state}: {earlier.summary})"
        )
        click.echo(
            f"  note: {description}; a replay fetches the priors again",
            err=True,
        )
    if dry_run:
        needs_force = " (with --force)" if unfinished or cancelled else ""
        click.echo(f"message {message_id} would be replayed{needs_force}: {plan.outcome}")
        for note in store.preview_actions(plan.actions, now):
            click.echo(f"  its actions would give: {note}")
        for job in plan.jobs:
            click.echo(f"  would create a job: route {job.route}, rule {job.rule}, {job.patient}")
        if unfinished:
            listed = ", ".join(f"{job.id} ({job.state})" for job in unfinished)
            click.echo(f"  note: jobs {listed} have not finished, so the replay needs --force")
        elif cancelled:
            click.echo(
                "  note: the order or a job of it was cancelled, so the replay needs --force"
            )
        return
    if cancelled and not force:
        click.echo(
            f"message {message_id} was not replayed: its order or a job of it was cancelled"
            " (see the notes). Replay it anyway with --force.",
            err=True,
        )
        raise SystemExit(1)
    replay = store.record_replay(message_id, plan.outcome, plan.jobs, now, plan.actions)
    click.echo(f"message {message_id} replayed (replay {replay.id}): {replay.outcome}")
    if not replay.job_ids:
        click.echo("  created no jobs")
    for job_id in replay.job_ids:
        created = store.get_job(job_id)
        state = str(created.state) if created is not None else "not found"
        reason = f" ({created.summary})" if created is not None and created.summary else ""
        click.echo(f"  created job {job_id}: {state}{reason}")
    if replay.job_ids and holder_of(lock_file_of(config.store_path)) is None:
        click.echo(
            "  note: no engine runs with this store now; the jobs run when `fdqr run` starts"
        )


def interpreter_for(
    config: config_module.Config, now: dt.datetime, replay: bool = False
) -> Interpreter:
    """Build the interpreter the engine uses, from a loaded configuration.

    For a replay, ADT messages change no patient record.
    """
    settings = config.settings
    return Interpreter(
        engine_planner(config, lambda: config.rule_set, lambda: now, replay),
        identifier_policy(settings),
        settings.mllp.charsets(),
        lambda origin: ignore_reason(config.rule_set, origin),
        tuple(settings.mllp.processing_ids),
    )


def known_authorities(settings: config_module.EngineSettings) -> frozenset[str]:
    """Return the assigning authorities (CX-4) of the engine's identifier domains.

    They are the local patient's, the nodes' and those of identity.domains, by
    issuer, namespace id and universal id.
    """
    local = settings.local_patient
    names = {local.issuer, *local.authorities}
    names |= {node.issuer for node in settings.nodes.values() if node.issuer}
    for issuer, domain in settings.identity.domains.items():
        names |= {issuer, domain.namespace_id or "", domain.universal_id or ""}
    return frozenset(name for name in names if name)


def render(
    content: bytes,
    charsets: CharsetDefaults,
    unredacted: bool,
    authorities: frozenset[str] | None = None,
) -> str:
    """Return a message's segments one per line, redacted unless asked not to.

    Redacted, an identifier whose assigning authority is not in authorities
    (see known_authorities) is hidden too: it can be a national or an
    insurance number sent without its identifier type.
    """
    try:
        message = parse(content, charsets)
    except HL7Error as error:
        if not unredacted:
            return f"(cannot be parsed: {error.text}; --unredacted shows the raw text)"
        return content.decode("utf-8", errors="replace").replace("\r", "\n").rstrip("\n")
    return "\n".join(
        _segment_text(message, index, unredacted, authorities)
        for index in range(len(message.segments))
    )


def _segment_text(
    message: Message, index: int, unredacted: bool, authorities: frozenset[str] | None
) -> str:
    segment = message.segments[index]
    fields = list(segment.fields)
    if not unredacted:
        for number in REDACTED_FIELDS.get(segment.id, ()):
            if number < len(fields) and fields[number]:
                fields[number] = REDACTED
        for number in IDENTIFIER_LIST_FIELDS.get(segment.id, ()):
            if number < len(fields) and fields[number]:
                fields[number] = _redact_personal_ids(
                    fields[number], message.delimiters, authorities
                )
    return message.delimiters.field.join(fields)


def _redact_personal_ids(
    field: str, delimiters: Delimiters, authorities: frozenset[str] | None
) -> str:
    """Replace the ID of each CX repetition whose type (CX-5) is a personal id, e.g. NI,
    or whose assigning authority (CX-4) is given and not among authorities."""
    repetitions = field.split(delimiters.repetition)
    for index, repetition in enumerate(repetitions):
        components = repetition.split(delimiters.component)
        kind = components[4] if len(components) > 4 else ""
        authority = components[3].split(delimiters.subcomponent) if len(components) > 3 else []
        named = [part for part in authority[:2] if part]
        foreign = authorities is not None and bool(named) and not set(named) & authorities
        if foreign or kind in PERSONAL_ID_TYPES or (kind.startswith("NN") and len(kind) == 5):
            components[0] = REDACTED
            repetitions[index] = delimiters.component.join(components)
    return delimiters.repetition.join(repetitions)


def ack_codes(ack: bytes) -> str:
    """Return the MSA-1 codes of stored acknowledgements, e.g. "CA AA"; "-" if none was sent."""
    codes = []
    for message in split_acks(ack):
        segments = _segments(message.decode("utf-8", errors="replace"))
        msa = segments[1] if len(segments) > 1 else ""
        codes.append(msa[4:6] if msa.startswith("MSA") else "?")
    return " ".join(codes) or "-"


def _segments(text: str) -> list[str]:
    return text.rstrip("\r").split("\r")


def _echo_header(message: MessageRecord, zone: LocalZone) -> None:
    origin = message.origin
    click.echo(
        f"message {message.id}: {origin.message_type} {origin.control_id} from"
        f" {origin.sending_application}/{origin.sending_facility} (peer {message.peer}),"
        f" received {zone.shown(message.received_at)}"
    )
    click.echo(f"  outcome: {message.outcome}")


def _echo_jobs(jobs: list[JobRecord]) -> None:
    if not jobs:
        click.echo("  jobs: none")
    for job in jobs:
        click.echo(f"  job {job.id}: {job.state} (rule {job.rule}) {job.summary}".rstrip())


def _content_heading(unredacted: bool) -> str:
    if unredacted:
        return "content (unredacted):"
    return (
        "content (names, birth dates, addresses, phone numbers, national ids and ids of"
        " other domains redacted; --unredacted shows them):"
    )
