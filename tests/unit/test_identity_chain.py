"""The identity chain: sources in order, the cache, learned identifiers and merges in SQLite."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet import defer

from engine.configfile import ConfigError
from engine.identity import records
from engine.identity.resolver import ChainResolver, Resolution
from engine.identity.settings import CacheSettings
from engine.identity.sources import (
    Answer,
    LearnedSource,
    SharedSource,
    TableSource,
)
from engine.identity.table import CrossReferenceTable, load_table
from engine.jobs.store import Store
from engine.model import Demographics, PatientIdentifier
from tests.conftest import NOW
from tests.fakes import ImmediateStore

T = TypeVar("T")
L1 = PatientIdentifier("L1", "LOCAL")
L2 = PatientIdentifier("L2", "LOCAL")
L3 = PatientIdentifier("L3", "LOCAL")
A1 = PatientIdentifier("A1", "HOSP_A")
A2 = PatientIdentifier("A2", "HOSP_A")


def result_of(deferred: defer.Deferred[T]) -> T:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    assert not isinstance(results[0], Exception), results[0]
    return results[0]  # type: ignore[no-any-return]


class ScriptedSource:
    """A network-like source whose answers the test sets; it counts its lookups."""

    cached = True
    needs_demographics = False

    def __init__(self, name: str, answers: dict[tuple[PatientIdentifier, str], Answer]) -> None:
        self.name = name
        self.answers = answers
        self.asked: list[tuple[PatientIdentifier, str, Demographics | None]] = []

    def lookup(
        self, identifier: PatientIdentifier, domain: str, demographics: Demographics | None
    ) -> defer.Deferred[Answer]:
        self.asked.append((identifier, domain, demographics))
        return defer.succeed(self.answers.get((identifier, domain), Answer.not_found("QAK-2 NF")))


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> dt.datetime:
        return self.now


def chain(
    db: ImmediateStore,
    sources: list[Any],
    clock: Clock | None = None,
    cache: CacheSettings | None = None,
) -> ChainResolver:
    return ChainResolver(
        db=db,  # type: ignore[arg-type]
        local_issuer="LOCAL",
        chains={"HOSP_A": sources},
        default_chain=[],
        cache=cache or CacheSettings(ttl_seconds=60, negative_ttl_seconds=10),
        now=clock or Clock(),
    )


def test_chain_first_found_wins_and_trail_lists_each_answer(db: ImmediateStore) -> None:
    table = TableSource(CrossReferenceTable({L2: {"HOSP_A": A2}}), "LOCAL")
    pix = ScriptedSource("pix", {(L1, "HOSP_A"): Answer.found(A1, "QAK-2 OK")})
    resolution = result_of(chain(db, [table, pix]).resolve(L1, "HOSP_A"))
    assert resolution == Resolution(
        A1,
        "pix",
        "QAK-2 OK",
        (
            "table: L1^^^LOCAL not found in HOSP_A: no entry for L1^^^LOCAL in HOSP_A",
            "pix: L1^^^LOCAL is A1^^^HOSP_A: QAK-2 OK",
        ),
    )


def test_chain_failure_then_found_uses_later_source(db: ImmediateStore) -> None:
    down = ScriptedSource("pix", {(L1, "HOSP_A"): Answer.failed("no response within 5 s")})
    learned = ScriptedSource("pdq", {(L1, "HOSP_A"): Answer.found(A1)})
    resolution = result_of(chain(db, [down, learned]).resolve(L1, "HOSP_A"))
    assert resolution.identifier == A1
    assert resolution.trail[0] == (
        "pix: lookup of L1^^^LOCAL in HOSP_A failed: no response within 5 s"
    )


def test_chain_transient_failure_is_reported(db: ImmediateStore) -> None:
    down = ScriptedSource("pix", {(L1, "HOSP_A"): Answer.failed("connection failed")})
    resolution = result_of(chain(db, [down]).resolve(L1, "HOSP_A"))
    assert resolution.identifier is None
    assert resolution.transient
    assert resolution.detail == "no identifier for L1^^^LOCAL in HOSP_A (pix)"


def test_chain_permanent_failure_not_transient(db: ImmediateStore) -> None:
    down = ScriptedSource("pix", {(L1, "HOSP_A"): Answer.failed("unknown target domain", False)})
    resolution = result_of(chain(db, [down]).resolve(L1, "HOSP_A"))
    assert resolution.identifier is None
    assert not resolution.transient
    assert resolution.trail == (
        "pix: lookup of L1^^^LOCAL in HOSP_A failed, not retried: unknown target domain",
    )


def test_chain_caches_answers_for_ttl(db: ImmediateStore) -> None:
    clock = Clock()
    pix = ScriptedSource("pix", {(L1, "HOSP_A"): Answer.found(A1, "QAK-2 OK")})
    resolver = chain(db, [pix], clock)
    assert result_of(resolver.resolve(L1, "HOSP_A")).identifier == A1
    clock.now += dt.timedelta(seconds=59)
    cached = result_of(resolver.resolve(L1, "HOSP_A"))
    assert cached.identifier == A1
    assert cached.trail == ("pix: L1^^^LOCAL is A1^^^HOSP_A: QAK-2 OK (cached)",)
    assert len(pix.asked) == 1
    clock.now += dt.timedelta(seconds=2)
    assert result_of(resolver.resolve(L1, "HOSP_A")).identifier == A1
    assert len(pix.asked) == 2


def test_chain_negative_answers_cached_shorter_failures_never(db: ImmediateStore) -> None:
    clock = Clock()
    pix = ScriptedSource("pix", {(L2, "HOSP_A"): Answer.failed("timed out")})
    resolver = chain(db, [pix], clock)
    result_of(resolver.resolve(L1, "HOSP_A"))
    result_of(resolver.resolve(L1, "HOSP_A"))
    assert len(pix.asked) == 1
    clock.now += dt.timedelta(seconds=11)
    result_of(resolver.resolve(L1, "HOSP_A"))
    assert len(pix.asked) == 2
    result_of(resolver.resolve(L2, "HOSP_A"))
    result_of(resolver.resolve(L2, "HOSP_A"))
    assert len(pix.asked) == 4


def test_chain_local_for_follows_merges(db: ImmediateStore) -> None:
    pix = ScriptedSource("pix", {(A1, "LOCAL"): Answer.found(L1)})
    records.merge(db.store, L2, L1, NOW, "M1")
    resolution = result_of(chain(db, [pix]).local_for(A1))
    assert resolution.identifier == L2
    assert resolution.trail[-1] == "L1^^^LOCAL was merged into L2^^^LOCAL"


def test_chain_resolves_retired_id_as_survivor(db: ImmediateStore) -> None:
    table = TableSource(CrossReferenceTable({L2: {"HOSP_A": A2}}), "LOCAL")
    records.merge(db.store, L2, L1, NOW, "M1")
    resolution = result_of(chain(db, [table]).resolve(L1, "HOSP_A"))
    assert resolution.identifier == A2
    assert resolution.trail[0] == "L1^^^LOCAL was merged into L2^^^LOCAL"


def test_chain_survivor_falls_back_to_retired_ids(db: ImmediateStore) -> None:
    table = TableSource(CrossReferenceTable({L1: {"HOSP_A": A1}}), "LOCAL")
    records.merge(db.store, L2, L1, NOW, "M1")
    resolution = result_of(chain(db, [table]).resolve(L2, "HOSP_A"))
    assert resolution.identifier == A1
    assert resolution.detail == " (through merged L1^^^LOCAL)"


def test_chain_pdq_gets_local_record(db: ImmediateStore) -> None:
    pdq = ScriptedSource("pdq", {})
    pdq.needs_demographics = True
    records.save_demographics(db.store, L1, Demographics("DOE^JANE", "19650312", "F"), NOW, "A1")
    result_of(chain(db, [pdq]).resolve(L1, "HOSP_A"))
    [(_, _, demographics)] = pdq.asked
    assert demographics == Demographics("DOE^JANE", "19650312", "F")


def test_shared_and_learned_sources(db: ImmediateStore) -> None:
    shared = SharedSource("LOCAL")
    assert result_of(shared.lookup(L1, "CLINIC", None)).identifier == PatientIdentifier(
        "L1", "CLINIC"
    )
    assert (
        result_of(shared.lookup(PatientIdentifier("L1", "CLINIC"), "LOCAL", None)).identifier == L1
    )
    learned = LearnedSource(db, "LOCAL")  # type: ignore[arg-type]
    records.learn(db.store, L1, A1, NOW, "ADT1")
    assert result_of(learned.lookup(L1, "HOSP_A", None)).identifier == A1
    assert result_of(learned.lookup(A1, "LOCAL", None)).identifier == L1
    assert result_of(learned.lookup(L2, "HOSP_A", None)).identifier is None


# Records


def test_learn_newest_wins_and_moves_owner(store: Store) -> None:
    assert records.learn(store, L1, A1, NOW, "ADT1") == "learned A1^^^HOSP_A for L1^^^LOCAL"
    assert records.learn(store, L1, A1, NOW, "ADT2") == "A1^^^HOSP_A already known for L1^^^LOCAL"
    assert records.learn(store, L1, A2, NOW, "ADT3") == (
        "learned A2^^^HOSP_A for L1^^^LOCAL (replaces A1^^^HOSP_A)"
    )
    assert records.learn(store, L2, A2, NOW, "ADT4") == (
        "learned A2^^^HOSP_A for L2^^^LOCAL (moved from L1^^^LOCAL)"
    )
    assert records.learned_remote(store, L1, "HOSP_A") is None
    assert records.learned_local(store, A2) == L2


def test_merge_moves_learned_and_cache(store: Store) -> None:
    records.learn(store, L1, A1, NOW, "ADT1")
    records.cache_answer(store, L1, "HOSP_B", "pix", PatientIdentifier("B1", "HOSP_B"), "", NOW, 60)
    records.cache_answer(store, A2, "LOCAL", "pix", L1, "", NOW, 60)
    note = records.merge(store, L2, L1, NOW, "A40-1")
    assert note == (
        "merged L1^^^LOCAL into L2^^^LOCAL (learned A1^^^HOSP_A moved; 2 cached answer(s) moved)"
    )
    assert records.learned_remote(store, L2, "HOSP_A") == A1
    assert records.learned_remote(store, L1, "HOSP_A") is None
    hit = records.cached_answer(store, L2, "HOSP_B", "pix", NOW)
    assert hit is not None
    assert hit.identifier == PatientIdentifier("B1", "HOSP_B")
    assert records.cached_answer(store, L1, "HOSP_B", "pix", NOW) is None
    reverse = records.cached_answer(store, A2, "LOCAL", "pix", NOW)
    assert reverse is not None
    assert reverse.identifier == L2


def test_merge_keeps_survivors_own_learned(store: Store) -> None:
    records.learn(store, L1, A1, NOW, "ADT1")
    records.learn(store, L2, A2, NOW, "ADT2")
    note = records.merge(store, L2, L1, NOW, "A40-1")
    assert "learned A1^^^HOSP_A dropped, L2^^^LOCAL has its own" in note
    assert records.learned_remote(store, L2, "HOSP_A") == A2
    assert records.learned_local(store, A1) is None


def test_merge_into_itself_ignored(store: Store) -> None:
    assert records.merge(store, L1, L1, NOW, "M") == "merge of L1^^^LOCAL into itself ignored"
    assert records.merges(store) == []


def test_merge_chain_resolves_transitively(store: Store) -> None:
    records.merge(store, L2, L1, NOW, "M1")
    records.merge(store, L3, L2, NOW, "M2")
    assert records.active_patient(store, L1) == (L3, [L2, L3])
    assert records.retired_into(store, L3) == [L2, L1]


def test_merge_never_creates_cycle(store: Store) -> None:
    records.merge(store, L2, L1, NOW, "M1")
    records.merge(store, L3, L2, NOW, "M2")
    # L3 (the active end of L1 -> L2 -> L3) retired into L1: that would be a cycle.
    note = records.merge(store, L1, L3, NOW, "M3")
    assert "earlier merge of L1^^^LOCAL into L2^^^LOCAL reversed" in note
    for patient in (L1, L2, L3):
        active, path = records.active_patient(store, patient)
        assert active == L1
        assert len(path) == len(set(path))
    assert records.active_patient(store, L1) == (L1, [])


def test_merge_repeated_is_no_op(store: Store) -> None:
    records.merge(store, L2, L1, NOW, "M1")
    assert (
        records.merge(store, L2, L1, NOW, "M2") == "L1^^^LOCAL was already merged into L2^^^LOCAL"
    )


def test_demographics_update_keeps_fields_empty_in_message(store: Store) -> None:
    assert records.save_demographics(
        store, L1, Demographics("DOE^JANE", "19650312", "F"), NOW, "A04"
    ) == ("demographics of L1^^^LOCAL recorded")
    records.save_demographics(store, L1, Demographics("DOE^JANE^MARIE", "", ""), NOW, "A08")
    assert records.local_demographics(store, L1) == Demographics("DOE^JANE^MARIE", "19650312", "F")


# The cross-reference table in CSV


def test_csv_table_loads(tmp_path: Path) -> None:
    path = tmp_path / "identity.csv"
    path.write_text(
        "local_id,local_issuer,remote_id,remote_issuer\n"
        "L1,LOCAL,A1,HOSP_A\n"
        "\n"
        'L1,LOCAL,"B,1",HOSP_B\n'
    )
    table = load_table(path)
    assert table.lookup(L1, "HOSP_B") == PatientIdentifier("B,1", "HOSP_B")
    assert table.local_for(A1, "LOCAL") == L1


def test_csv_table_errors_name_line(tmp_path: Path) -> None:
    path = tmp_path / "identity.csv"
    path.write_text(
        "local_id,local_issuer,remote_id,remote_issuer\n"
        "L1,LOCAL,A1,HOSP_A\n"
        "L2,LOCAL,,HOSP_A\n"
        "L2,LOCAL,A1,HOSP_A\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_table(path)
    assert [str(problem) for problem in raised.value.problems] == [
        f"{path}:3: row 3: invalid row 'L2,LOCAL,,HOSP_A'"
        " (each row needs the four values local_id,local_issuer,remote_id,remote_issuer)",
    ]
    path.write_text(
        "local_id,local_issuer,remote_id,remote_issuer\nL1,LOCAL,A1,HOSP_A\nL2,LOCAL,A1,HOSP_A\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_table(path)
    assert str(raised.value) == (
        f"{path}:3: row 3: A1^^^HOSP_A is already mapped to local patient L1^^^LOCAL"
        " (one remote identifier belongs to one local patient)"
    )


def test_csv_table_header_checked(tmp_path: Path) -> None:
    path = tmp_path / "identity.csv"
    path.write_text("local,remote\nL1,A1\n")
    with pytest.raises(ConfigError) as raised:
        load_table(path)
    assert str(raised.value) == (
        f"{path}:1: header: invalid CSV header 'local,remote'"
        " (the first line must be local_id,local_issuer,remote_id,remote_issuer)"
    )


# The demographics check before storing


@pytest.mark.parametrize(
    ("remote", "strictness", "expected"),
    [
        (Demographics("DOE^JANE", "19650312", "F"), "exact", []),
        (Demographics("DOE^JANE^^", "19650312", "F"), "exact", []),
        (Demographics("doe^jane", "19650312", "F"), "exact", ["name differs"]),
        (Demographics("doe^jane", "19650312", "f"), "normalised", []),
        (Demographics("JANE^DOE", "19650312", "F"), "normalised", []),
        (Demographics("DÖE^JANÉ^MARIE", "1965-03-12", "F"), "normalised", []),
        (Demographics("DOE^JOAN", "19650312", "F"), "normalised", ["name differs"]),
        (
            Demographics("DOE^JANE", "19650313", "M"),
            "normalised",
            ["birth date differs", "sex differs"],
        ),
        (Demographics("", "", ""), "normalised", []),
        (Demographics("ROE^RICHARD", "19580101", "M"), "off", []),
    ],
)
def test_demographics_check(remote: Demographics, strictness: str, expected: list[str]) -> None:
    from engine.identity.check import differences
    from engine.identity.settings import CheckSettings

    local = Demographics("DOE^JANE", "19650312", "F")
    assert differences(local, remote, CheckSettings(strictness=strictness)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ours", "theirs", "same"),
    [
        ("=山田^太郎", "=鈴木^花子", False),
        ("=山田^太郎", "=山田^太郎", True),
        ("YAMADA^TARO=山田^太郎", "=山田^太郎", True),
        ("YAMADA^TARO=山田^太郎", "YAMADA^TARO=鈴木^花子", True),
        ("=山田^太郎", "YAMADA^TARO", False),
        ("==やまだ^たろう", "==すずき^はなこ", False),
    ],
)
def test_names_compared_in_common_component_group(ours: str, theirs: str, same: bool) -> None:
    from engine.identity.check import same_value

    assert same_value("name", ours, theirs, False) is same


def test_demographics_check_missing_values_can_quarantine() -> None:
    from engine.identity.check import differences
    from engine.identity.settings import CheckSettings

    local = Demographics("DOE^JANE", "19650312", "F")
    settings = CheckSettings(when_missing="quarantine", attributes=["birth_date"])
    assert differences(local, Demographics("X^Y", "", ""), settings) == [
        "birth date not returned by the source"
    ]
