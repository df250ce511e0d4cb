"""Building the federated Q/R SCP from the configuration, for engine.service."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.audit import Auditor, Node
from engine.config import Config
from engine.dimse.pools import NodePools
from engine.dimse.scu import AssociationTracker, NodeClient
from engine.federation.fanout import DemographicsLookup, Federation, MemberSite
from engine.federation.locations import LocationMemory
from engine.federation.qrscp import QRService
from engine.federation.retrieve import Retrieval, site_runners
from engine.federation.settings import site_issuer
from engine.identity.resolver import IdentityResolver
from engine.jobs.guard import RetrievalGuard
from engine.jobs.receiving import ExpectationRegistry
from engine.jobs.spool import Spool


def build_qr_service(
    config: Config,
    reactor: Any,
    pools: NodePools,
    clients: dict[str, NodeClient],
    registry: ExpectationRegistry,
    guard: RetrievalGuard,
    tracker: AssociationTracker,
    identity: Callable[[], IdentityResolver],
    spool: Spool,
    demographics: DemographicsLookup,
    audit: Auditor | None = None,
) -> QRService:
    settings = config.settings
    federation_settings = settings.federation
    sites = {
        name: MemberSite(
            name=name,
            ae_title=settings.nodes[name].ae_title,
            issuer=site_issuer(settings, name),
            timeout_seconds=site.timeout_seconds,
            queries_without_patient_id=site.queries_without_patient_id,
            relational=site.relational,
        )
        for name, site in federation_settings.sites.items()
    }
    run_site, count_instances, move = site_runners(pools, clients)
    federation = Federation(
        reactor=reactor,
        sites=sites,
        identity=identity,
        run_site=run_site,
        locations=LocationMemory(reactor.seconds, federation_settings.location_memory_seconds),
        local_issuer=settings.local_patient.issuer,
        ae_title=settings.dicom.ae_title,
        max_answers=federation_settings.max_answers,
        demographics=demographics,
        check=settings.identity.check,
    )
    retrieval = Retrieval(
        federation=federation,
        registry=registry,
        guard=guard,
        clients=clients,
        count_instances=count_instances,
        move=move,
        spool=spool,
    )
    return QRService(
        reactor,
        federation,
        retrieval,
        federation_settings,
        tracker,
        settings.dicom.max_pdu_bytes,
        audit,
        {
            name: Node(settings.nodes[name].ae_title, settings.nodes[name].host)
            for name in federation_settings.sites
        },
    )
