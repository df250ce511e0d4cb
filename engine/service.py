"""Building and wiring the engine's parts from a loaded configuration.

This is the one place that knows every part. Start order: store, node pools,
Storage SCP, job worker, then the MLLP listener, so nothing is accepted before
it can be processed. Stop order is the reverse.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
from collections.abc import Generator, Sequence
from typing import Any

from twisted.internet import defer, endpoints, task, threads
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort

from engine.audit import Action as AuditAction
from engine.audit import Auditor, FileSink, Node, Outcome, Sink, UdpSink
from engine.auditstream import StreamSink, stream_endpoint
from engine.coercion import DEFAULT_PROFILE
from engine.config import (
    MEMORY_STORE,
    AuditTLSSettings,
    Config,
    MLLPTLSSettings,
    audit_tls_options,
    mllp_tls_options,
    settings_digest,
    syslog_address,
)
from engine.dimse.pools import NodePools
from engine.dimse.scu import AssociationTracker, NodeAddress, NodeClient, RetryPolicy
from engine.dimse.storescp import StorageSCP, configure_pynetdicom
from engine.federation.wiring import build_qr_service
from engine.hl7.ack import share_control_ids
from engine.hl7.intake import Intake, ignore_reason
from engine.hl7.mllp import MLLPFactory
from engine.hl7.processes import ChildCommand, Dispatcher, IntakeEvents, IntakeProcesses
from engine.hl7.tls import wrap
from engine.hl7.wiring import engine_planner, engine_rules, identifier_policy
from engine.identity.build import build_resolver
from engine.identity.records import known_demographics
from engine.jobs.guard import RetrievalGuard
from engine.jobs.planner import PatientChange
from engine.jobs.prefetch import Prefetch, Source, StudyResult
from engine.jobs.receiving import ExpectationRegistry, Receiver
from engine.jobs.retention import Retention
from engine.jobs.spool import Spool
from engine.jobs.store import AsyncStore, JobRecord, Store, StoreError, StudyState
from engine.jobs.sweep import SpoolSweep
from engine.jobs.transfer import TransferSettings
from engine.jobs.worker import Worker
from engine.model import MessageOrigin, StudyCandidate
from engine.rules.reload import RuleFileWatcher
from engine.runlock import RunLock, lock_file_of, other_engine_spool
from engine.tlsfiles import TLSConfigError
from engine.web.metrics import EngineMetrics, JobCountRefresh
from engine.web.server import build_site
from engine.worklist.poller import WorklistPoller

logger = logging.getLogger(__name__)

# How often the retrieves in progress are checked for a cancel of their job and
# for a move of their remote ID. A move is also checked after each ADT message
# that changes patient records. This check also finds moves that another process
# wrote, such as an intake process that ended before it reported the ADT.
CANCEL_CHECK_SECONDS = 2.0
# Running jobs get this long to end after their associations were aborted.
STOP_GRACE_SECONDS = 15.0
# How long a stopping engine waits for node threads after the grace, before it exits without them.
THREAD_STOP_SECONDS = 10.0


class Engine:
    def __init__(self, config: Config, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        settings = config.settings
        configure_pynetdicom()
        self.rules = engine_rules(config)
        self.rule_watcher = RuleFileWatcher(self.rules, reactor, settings.rules_reload_seconds)

        self.db = AsyncStore(reactor, Store(config.store_path))
        # Lock files next to the store file and the spool folder, e.g. fdqr.sqlite.lock.
        self.locks = [RunLock(lock_file_of(config.spool_path), f"the spool {config.spool_path}")]
        if str(config.store_path) != MEMORY_STORE:
            self.locks.insert(
                0, RunLock(lock_file_of(config.store_path), f"the store {config.store_path}")
            )
        self.tracker = AssociationTracker()
        # Node threads a stop had to leave behind (see stop).
        self.abandoned_threads: list[str] = []
        transfer = settings.transfer
        retry = RetryPolicy(transfer.association_attempts, transfer.association_retry_seconds)
        self.clients = {
            name: NodeClient(
                NodeAddress(name, node.ae_title, node.host, node.port, node.timeout_seconds),
                settings.dicom.ae_title,
                self.tracker,
                settings.dicom.max_pdu_bytes,
                max_associations=node.max_associations,
                retry=retry,
            )
            for name, node in settings.nodes.items()
        }
        self.pools = NodePools(
            reactor, {name: node.max_associations for name, node in settings.nodes.items()}
        )
        self.resolver = build_resolver(
            settings.identity,
            config.identity_table,
            settings.local_patient.issuer,
            self.db,
            reactor,
            self.now,
        )
        self.registry = ExpectationRegistry(settings.dicom.ae_title)
        self.guard = RetrievalGuard(self.db, self.registry)
        self.spool = Spool(
            config.spool_path, settings.spool.max_bytes, settings.spool.full_wait_seconds
        )
        self.receiver = Receiver(self.registry, fsync=settings.spool.fsync, spool=self.spool)
        self.metrics = EngineMetrics(spool_bytes=lambda: self.spool.used_bytes)
        # Its sinks are opened at start, so a bad address stops the start with a StartError.
        self.audit = Auditor(
            settings.dicom.ae_title,
            settings.audit.source_id,
            settings.audit.site,
            now=self.now,
            on_failed=lambda sink: self.metrics.audit_records_lost.labels(sink).inc(),
        )
        self.job_counts = JobCountRefresh(
            self.db, self.metrics, reactor, settings.web.refresh_seconds
        )
        self.spool_sweep = SpoolSweep(self.spool, self.db, reactor)
        self.retention = (
            Retention(self.db, settings.store.retention_days, reactor, self.now)
            if settings.store.retention_days is not None
            else None
        )
        # A cancel or an ID move while a study is retrieved stops the retrieve within this interval.
        self.cancel_check = task.LoopingCall(self._check_running_retrievals)
        self.cancel_check.clock = reactor
        self.web_port: IListeningPort | None = None
        self.scp = StorageSCP(
            settings.dicom.ae_title,
            settings.dicom.host,
            settings.dicom.port,
            self.receiver,
            max_pdu_bytes=settings.dicom.max_pdu_bytes,
        )
        if settings.federation.enabled:
            qr_service = build_qr_service(
                config,
                reactor,
                self.pools,
                self.clients,
                self.registry,
                self.guard,
                self.tracker,
                identity=lambda: self.resolver,
                spool=self.spool,
                demographics=lambda patient: self.db.run(
                    lambda store: known_demographics(store, patient)
                ),
                audit=self.audit,
            )
            # The Q/R SCP shares the Storage SCP's AE title and port.
            self.scp.add_service(qr_service.configure, qr_service.handlers)
        self.prefetch = Prefetch(
            db=self.db,
            pools=self.pools,
            clients=self.clients,
            sources={
                name: Source(name, node.ae_title, node.issuer, node.retrieve)
                for name, node in settings.nodes.items()
                if node.issuer is not None
            },
            registry=self.registry,
            guard=self.guard,
            identity=lambda: self.resolver,
            rule_set=self.rules.current,
            engine_ae_title=settings.dicom.ae_title,
            spool_root=config.spool_path,
            now=self.now,
            coercion=lambda name: self.config.coercion_profiles.get(name, DEFAULT_PROFILE),
            check=settings.identity.check,
            policies=settings.source_policies(),
            zone=settings.zone,
            spool=self.spool,
            receiver=self.receiver,
            transfer_settings=TransferSettings(
                transfer.study_deadline_seconds,
                transfer.destination_associations,
                transfer.repair_passes,
                frozenset(name for name, node in settings.nodes.items() if node.store_only),
                check_objects=settings.identity.check.strictness != "off",
            ),
            stopping=lambda: self.tracker.closed,
            on_study=self._study_ended,
        )
        jobs = settings.jobs
        self.worker = Worker(
            self.db,
            self.prefetch.run,
            reactor,
            concurrency=jobs.concurrency,
            max_attempts=jobs.max_attempts,
            retry_base_seconds=jobs.retry_delay_seconds,
            retry_max_seconds=jobs.max_retry_delay_seconds,
            poll_seconds=jobs.poll_seconds,
            on_finished=self.metrics.job_finished,
        )
        policy = identifier_policy(settings)
        self.planner = engine_planner(config, self.rules.current, self.now)
        self.intake = Intake(
            self.db,
            self.planner,
            policy,
            charsets=settings.mllp.charsets(),
            now=self.now,
            on_jobs_created=self.worker.wake,
            ignored=lambda origin: ignore_reason(self.rules.current(), origin),
            on_answered=self.metrics.answered,
            on_duplicate=self.metrics.hl7_duplicates.inc,
            on_patient_records=self._patient_records_changed,
            processing_ids=settings.mllp.processing_ids,
        )
        self.worklist = WorklistPoller(
            settings.worklist,
            self.clients,
            self.pools,
            self.db,
            self.planner,
            policy,
            reactor,
            on_jobs_created=self.worker.wake,
        )
        self.mllp_port: IListeningPort | None = None
        self.intake_processes: IntakeProcesses | None = None
        self.dispatcher: Dispatcher | None = None

    def now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.reactor.seconds(), dt.UTC)

    def _study_ended(self, job: JobRecord, candidate: StudyCandidate, result: StudyResult) -> None:
        self.metrics.study_ended(result.state, result.stored_in_attempt)
        outcome = transfer_outcome(result)
        if outcome is None:
            return
        nodes = self.config.settings.nodes
        source, destination = nodes[candidate.source], nodes[job.destination]
        self.audit.study_transferred(
            job.patient,
            candidate.study_instance_uid,
            Node(source.ae_title, source.host),
            Node(destination.ae_title, destination.host),
            outcome,
            result.problem,
        )

    def _check_running_retrievals(self) -> defer.Deferred[Any]:
        checks = [
            self.guard.stop_cancelled().addErrback(
                lambda failure: logger.error(
                    "checking running retrieves for cancels failed: %s", failure.getErrorMessage()
                )
            ),
            self.guard.stop_moved().addErrback(
                lambda failure: logger.error(
                    "checking running retrieves for moved identifiers failed: %s",
                    failure.getErrorMessage(),
                )
            ),
        ]
        return defer.gatherResults(checks)

    def _patient_records_changed(
        self, origin: MessageOrigin, peer: str, changes: Sequence[PatientChange]
    ) -> None:
        # A learned remote ID may have moved to another patient while its study is retrieved.
        stopping = self.guard.stop_moved()
        stopping.addErrback(
            lambda failure: logger.error(
                "checking retrievals after message %s failed: %s",
                origin.control_id,
                failure.getErrorMessage(),
            )
        )
        sender = Node(f"{origin.sending_application}|{origin.sending_facility}", _host_of(peer))
        for change in changes:
            self.audit.patient_record(
                sender,
                change.patient,
                AuditAction.DELETE if change.retired else AuditAction.UPDATE,
                origin.message_type,
                origin.control_id,
            )

    def _open_syslog(self, syslog: str, tls: AuditTLSSettings | None) -> Sink:
        kind, host, port = syslog_address(syslog)
        if kind == "udp":
            try:
                return UdpSink(host, port, syslog)
            except OSError as error:
                raise StartError(
                    f"the audit syslog address {syslog} (audit.syslog) cannot be used:"
                    f" {error.strerror or error}"
                ) from error
        options = None
        if tls is not None:
            try:
                options = audit_tls_options(self.config.path, syslog, tls)
            except TLSConfigError as error:
                raise StartError(f"audit.tls: {error}") from error
        stream = StreamSink(
            self.reactor,
            self.reactor.callFromThread,
            stream_endpoint(self.reactor, kind, host, port, options),
            syslog,
            tls=kind == "tls",
            on_dropped=self.metrics.audit_records_lost.labels(syslog).inc,
        )
        stream.start()
        return stream

    def _open_audit_sinks(self) -> list[Sink]:
        settings = self.config.settings.audit
        sinks: list[Sink] = []
        if settings.syslog is not None:
            sinks.append(self._open_syslog(settings.syslog, settings.tls))
        audit_file = self.config.audit_file
        if audit_file is not None:
            try:
                sinks.append(FileSink(audit_file))
            except OSError as error:
                raise StartError(
                    f"the audit file {audit_file} (audit.file) cannot be opened:"
                    f" {error.strerror or error}"
                ) from error
        return sinks

    @defer.inlineCallbacks
    def start(self) -> Generator[defer.Deferred[Any], Any, None]:
        settings = self.config.settings
        for lock in self.locks:
            lock.acquire()
        overlap = other_engine_spool(self.config.spool_path, [lock.path for lock in self.locks])
        if overlap is not None:
            raise StartError(f"{overlap}; give each engine a spool.path of its own")
        self.spool.open()
        self.audit.sinks = self._open_audit_sinks()
        for sink in self.audit.sinks:
            # The counter shows 0 for each sink from the start, not only after a loss.
            self.metrics.audit_records_lost.labels(sink.name)
        self.db.start()
        self.pools.start()
        try:
            self.scp.start()
        except OSError as error:
            raise StartError(
                f"the DICOM listener on {settings.dicom.host}:{settings.dicom.port}"
                f" (dicom.host, dicom.port) failed: {error.strerror or error}"
            ) from error
        # The listeners first: a listener that fails stops the start before any job runs.
        if settings.web.listen is not None:
            self.job_counts.start()
            web_endpoint = _endpoint(self.reactor, "web.listen", settings.web.listen)
            self.web_port = yield _listen(
                web_endpoint, build_site(self.metrics, self.db), "web.listen", settings.web.listen
            )
            logger.info("status page, API and metrics on %s", settings.web.listen)
        endpoint = _endpoint(self.reactor, "mllp.listen", settings.mllp.listen)
        factory: Any = MLLPFactory(
            self.intake,
            max_message_bytes=settings.mllp.max_message_bytes,
            idle_timeout=settings.mllp.idle_timeout_seconds,
        )
        if settings.mllp.tls is not None:
            factory = wrap(factory, mllp_tls_options(self.config.path, settings.mllp.tls))
        self.mllp_port = yield _listen(endpoint, factory, "mllp.listen", settings.mllp.listen)
        if settings.mllp.processes:
            self._start_intake_processes(self.mllp_port, factory)
        yield self.worker.start()
        self.spool_sweep.start()
        if self.retention is not None:
            self.retention.start()
        self.cancel_check.start(CANCEL_CHECK_SECONDS, now=False)
        self.worklist.start()
        if settings.rules_reload_seconds > 0:
            self.rule_watcher.start()
        logger.info(
            "engine started: MLLP on %s%s%s, DICOM %s on %s:%d%s, %d routes, %d rules",
            settings.mllp.listen,
            _describe_tls(settings.mllp.tls),
            f" ({settings.mllp.processes} intake processes)" if settings.mllp.processes else "",
            settings.dicom.ae_title,
            settings.dicom.host,
            settings.dicom.port,
            " (Storage SCP and federated Q/R SCP)" if settings.federation.enabled else "",
            len(self.config.rule_set.routes),
            len(self.config.rule_set.rules),
        )
        if not self.config.rule_set.routes:
            logger.warning("no routes are defined, so no HL7 order or worklist entry creates a job")
        if self.audit.enabled:
            logger.info("audit records to %s", ", ".join(sink.name for sink in self.audit.sinks))
        self.audit.application_started()

    def _start_intake_processes(self, port: Any, factory: Any) -> None:
        """Accept MLLP connections here and pass them to intake processes to serve."""
        # No connection was accepted yet: the reactor has not run since the listen.
        port.stopReading()
        # The engine's ACKs take residue 0 of the ACK control ids, child N residue N.
        step = self.config.settings.mllp.processes + 1
        share_control_ids(step, step)
        self.intake_processes = IntakeProcesses(
            self.reactor,
            ChildCommand(
                self.config.path,
                logging.getLevelName(logging.getLogger().getEffectiveLevel()),
                port.addressFamily,
                settings_digest(self.config.settings, self.config.identity_table),
            ),
            self.config.settings.mllp.processes,
            IntakeEvents(
                jobs_created=self.worker.wake,
                answered=self.metrics.answered_code,
                duplicates=self.metrics.hl7_duplicates.inc,
                patient_records=self._patient_records_changed,
            ),
            serve_here=factory,
            rules=lambda: self.rules.digest,
        )
        self.rules.listeners.append(self.intake_processes.rules_reloaded)
        self.intake_processes.start()
        self.dispatcher = Dispatcher(port.socket, self.intake_processes)
        self.reactor.addReader(self.dispatcher)

    @defer.inlineCallbacks
    def stop(self) -> Generator[defer.Deferred[Any], Any, None]:
        logger.info("engine stopping")
        self.rule_watcher.stop()
        if self.dispatcher is not None:
            self.reactor.removeReader(self.dispatcher)
        if self.intake_processes is not None:
            yield self.intake_processes.stop()
        if self.mllp_port is not None:
            yield defer.maybeDeferred(self.mllp_port.stopListening)
        self.job_counts.stop()
        self.spool_sweep.stop()
        if self.retention is not None:
            self.retention.stop()
        if self.cancel_check.running:
            self.cancel_check.stop()
        if self.web_port is not None:
            yield defer.maybeDeferred(self.web_port.stopListening)
        work_ended = defer.DeferredList(
            [self.worker.stop(), self.worklist.stop()], consumeErrors=True
        )
        self.tracker.abort_all()
        timeout = self.reactor.callLater(STOP_GRACE_SECONDS, work_ended.cancel)
        try:
            yield work_ended
        except defer.CancelledError:
            logger.warning(
                "jobs still running after %ss; they resume at next start", STOP_GRACE_SECONDS
            )
        if timeout.active():
            timeout.cancel()
        yield threads.deferToThread(self.scp.stop)
        stuck = self.pools.stop(THREAD_STOP_SECONDS)
        if stuck:
            self.abandoned_threads = stuck
            logger.warning(
                "%d thread(s) still wait on a peer after %ss (%s); the process exits without them",
                len(stuck),
                THREAD_STOP_SECONDS,
                ", ".join(stuck),
            )
        self.db.stop()
        self.audit.application_stopped()
        yield self.audit.close()
        for lock in self.locks:
            lock.release()
        logger.info("engine stopped")


def _host_of(peer: str) -> str:
    """Return the address of an MLLP peer described as HOST:PORT."""
    host, separator, port = peer.rpartition(":")
    return host if separator and port.isdigit() else peer


# The audit outcome of a study's transfer; other states moved no instances.
_TRANSFER_OUTCOMES = {
    StudyState.STORED: Outcome.SUCCESS,
    StudyState.INCOMPLETE: Outcome.MINOR_FAILURE,
    StudyState.FAILED: Outcome.SERIOUS_FAILURE,
}


def transfer_outcome(result: StudyResult) -> Outcome | None:
    """Return the outcome of the transfer record a study's attempt gets, or None for none.

    An attempt that stored nothing at the destination moved nothing there: a
    retry that finds the study complete, or a destination that is down. A
    failed study is recorded when objects arrived from the source.
    """
    outcome = _TRANSFER_OUTCOMES.get(result.state)
    if result.state is StudyState.FAILED:
        return outcome if result.received else None
    return outcome if result.stored_in_attempt else None


def run(config: Config, reactor: Any = None) -> int:
    """Run the engine until SIGINT or SIGTERM; return the process exit status."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    try:
        engine = Engine(config, reactor)
    except StoreError as error:
        logger.error("engine failed to start: %s", error)
        return 1
    exit_status = 0

    def failed_to_start(failure: Any) -> None:
        nonlocal exit_status
        logger.error("engine failed to start: %s", failure.getErrorMessage())
        exit_status = 1
        reactor.stop()

    reactor.callWhenRunning(lambda: engine.start().addErrback(failed_to_start))
    signal.signal(
        signal.SIGHUP,
        lambda number, frame: reactor.callFromThread(engine.rules.reload, "SIGHUP"),
    )
    reactor.addSystemEventTrigger("before", "shutdown", engine.stop)
    reactor.run()
    if engine.abandoned_threads:
        # Python would wait for those threads at exit; everything else is already closed.
        # NOTE: no integration test reaches this: every blocking call known ends on stop.
        logging.shutdown()
        os._exit(exit_status)
    return exit_status


class StartError(Exception):
    """A part of the engine could not start; the message names the part and its setting."""


def _endpoint(reactor: Any, setting: str, value: str) -> Any:
    """Build a listening endpoint; a StartError names the setting when that fails."""
    try:
        return endpoints.serverFromString(reactor, value)  # type: ignore[no-untyped-call]
    except Exception as error:
        # E.g. an ssl: endpoint whose key file is missing.
        raise StartError(f"the listener {value} ({setting}) cannot be used: {error}") from error


@defer.inlineCallbacks
def _listen(
    endpoint: Any, factory: Any, setting: str, value: str
) -> Generator[defer.Deferred[Any], Any, IListeningPort]:
    try:
        port: IListeningPort = yield endpoint.listen(factory)
    except CannotListenError as error:
        reason = getattr(error.socketError, "strerror", None) or error.socketError
        raise StartError(f"the listener {value} ({setting}) failed: {reason}") from error
    return port


def _describe_tls(tls: MLLPTLSSettings | None) -> str:
    if tls is None:
        return ""
    return " with TLS, client certificates required" if tls.client_ca else " with TLS"
