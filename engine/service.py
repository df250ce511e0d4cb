"""Building and wiring the engine's parts from a loaded configuration.

This is the one place that knows every part. Start order: store, node pools,
Storage SCP, job worker, then the MLLP listener, so nothing is accepted before
it can be processed. Stop order is the reverse.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Generator
from typing import Any

from twisted.internet import defer, endpoints, threads
from twisted.internet.interfaces import IListeningPort

from engine.config import Config
from engine.dimse.pools import NodePools
from engine.dimse.scu import AssociationTracker, NodeAddress, NodeClient, RetryPolicy
from engine.dimse.storescp import StorageSCP, configure_pynetdicom
from engine.hl7.events import IdentifierPolicy
from engine.hl7.intake import Intake
from engine.hl7.mllp import MLLPFactory
from engine.identity.resolver import TableResolver
from engine.jobs.planner import Planner
from engine.jobs.prefetch import Prefetch, Source
from engine.jobs.receiving import ExpectationRegistry, Receiver
from engine.jobs.spool import Spool
from engine.jobs.store import AsyncStore, Store
from engine.jobs.transfer import TransferSettings
from engine.jobs.worker import Worker

logger = logging.getLogger(__name__)

# Running jobs get this long to end after their associations were aborted.
STOP_GRACE_SECONDS = 15.0


class Engine:
    def __init__(self, config: Config, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        settings = config.settings
        configure_pynetdicom()

        self.db = AsyncStore(reactor, Store(config.store_path))
        self.tracker = AssociationTracker()
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
        self.registry = ExpectationRegistry(settings.dicom.ae_title)
        self.spool = Spool(
            config.spool_path, settings.spool.max_bytes, settings.spool.full_wait_seconds
        )
        self.receiver = Receiver(
            reactor, self.registry, fsync=settings.spool.fsync, spool=self.spool
        )
        self.scp = StorageSCP(
            settings.dicom.ae_title,
            settings.dicom.host,
            settings.dicom.port,
            self.receiver,
            max_pdu_bytes=settings.dicom.max_pdu_bytes,
        )
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
            identity=lambda: TableResolver(
                self.config.identity_table, self.config.settings.local_patient.issuer
            ),
            rule_set=lambda: self.config.rule_set,
            engine_ae_title=settings.dicom.ae_title,
            spool_root=config.spool_path,
            now=self.now,
            spool=self.spool,
            receiver=self.receiver,
            transfer_settings=TransferSettings(
                transfer.study_deadline_seconds,
                transfer.destination_associations,
                transfer.repair_passes,
                frozenset(name for name, node in settings.nodes.items() if node.store_only),
            ),
            stopping=lambda: self.tracker.closed,
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
        )
        local = settings.local_patient
        self.intake = Intake(
            self.db,
            Planner(lambda: self.config.rule_set, now=self.now),
            IdentifierPolicy(
                issuer=local.issuer,
                authorities=frozenset(local.authorities or [local.issuer]),
                unqualified_ids_are_local=local.unqualified_ids_are_local,
            ),
            default_charset=settings.mllp.default_charset,
            now=self.now,
            on_jobs_created=self.worker.wake,
        )
        self.mllp_port: IListeningPort | None = None

    def now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.reactor.seconds(), dt.UTC)

    @defer.inlineCallbacks
    def start(self) -> Generator[defer.Deferred[Any], Any, None]:
        settings = self.config.settings
        self.spool.open()
        self.db.start()
        self.pools.start()
        self.scp.start()
        yield self.worker.start()
        endpoint = endpoints.serverFromString(  # type: ignore[no-untyped-call]
            self.reactor, settings.mllp.listen
        )
        factory = MLLPFactory(
            self.intake,
            max_message_bytes=settings.mllp.max_message_bytes,
            idle_timeout=settings.mllp.idle_timeout_seconds,
        )
        self.mllp_port = yield endpoint.listen(factory)
        logger.info(
            "engine started: MLLP on %s, DICOM %s on %s:%d, %d routes, %d rules",
            settings.mllp.listen,
            settings.dicom.ae_title,
            settings.dicom.host,
            settings.dicom.port,
            len(self.config.rule_set.routes),
            len(self.config.rule_set.rules),
        )

    @defer.inlineCallbacks
    def stop(self) -> Generator[defer.Deferred[Any], Any, None]:
        logger.info("engine stopping")
        if self.mllp_port is not None:
            yield defer.maybeDeferred(self.mllp_port.stopListening)
        jobs_ended = self.worker.stop()
        self.tracker.abort_all()
        timeout = self.reactor.callLater(STOP_GRACE_SECONDS, jobs_ended.cancel)
        try:
            yield jobs_ended
        except defer.CancelledError:
            logger.warning(
                "jobs still running after %ss; they resume at next start", STOP_GRACE_SECONDS
            )
        if timeout.active():
            timeout.cancel()
        yield threads.deferToThread(self.scp.stop)
        self.pools.stop()
        self.db.stop()
        logger.info("engine stopped")


def run(config: Config, reactor: Any = None) -> int:
    """Run the engine until SIGINT or SIGTERM; return the process exit status."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    engine = Engine(config, reactor)
    exit_status = 0

    def failed_to_start(failure: Any) -> None:
        nonlocal exit_status
        logger.error("engine failed to start: %s", failure.getErrorMessage())
        exit_status = 1
        reactor.stop()

    reactor.callWhenRunning(lambda: engine.start().addErrback(failed_to_start))
    reactor.addSystemEventTrigger("before", "shutdown", engine.stop)
    reactor.run()
    return exit_status
