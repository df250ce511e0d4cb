"""Prior selection options, the anatomy table, query planning and the C-FIND identifiers."""

from __future__ import annotations

import datetime as dt
import textwrap
from pathlib import Path

import pytest

from engine.configfile import ConfigError
from engine.dimse.queries import candidate_queries, describe_query
from engine.model import Decision, OrderFacts, PatientIdentifier, StudyCandidate
from engine.rules.anatomy import Anatomy, load_anatomy
from engine.rules.loader import load_rule_set
from engine.rules.model import RuleSet
from engine.rules.select import StudyQuery, plan_query, select_priors

REPOSITORY = Path(__file__).resolve().parents[2]
TODAY = dt.date(2026, 3, 14)
ROUTES = """
routes:
  - name: ris
    sources: [a, b]
    destination: local
"""


@pytest.fixture(scope="module")
def anatomy() -> Anatomy:
    return load_anatomy(REPOSITORY / "conf" / "anatomy.yaml")


def rule_set_with(tmp_path: Path, anatomy: Anatomy, select: str, extra: str = "") -> RuleSet:
    routes = tmp_path / "routes"
    rules = tmp_path / "rules"
    routes.mkdir(exist_ok=True)
    rules.mkdir(exist_ok=True)
    (routes / "r.yaml").write_text(ROUTES)
    body = "rules:\n  - name: r\n    select:\n" + textwrap.indent(textwrap.dedent(select), "      ")
    (rules / "p.yaml").write_text(extra + body)
    return load_rule_set(routes, rules, anatomy)


def study(
    uid: str,
    date: dt.date | None,
    modalities: tuple[str, ...] = ("CT",),
    description: str = "",
    source: str = "a",
    count: int | None = None,
) -> StudyCandidate:
    return StudyCandidate(
        source, uid, PatientIdentifier("R", source), date, "", modalities, description, "", count
    )


def decide(
    rule_set: RuleSet, candidates: list[StudyCandidate], order: OrderFacts | None = None
) -> dict[str, Decision]:
    decisions = select_priors(
        rule_set.rules["r"], order or OrderFacts(), candidates, TODAY, rule_set
    )
    assert len(decisions) == len(candidates)
    return {f"{d.candidate.source}:{d.candidate.study_instance_uid}": d for d in decisions}


def chosen(decisions: dict[str, Decision]) -> list[str]:
    return sorted(key.split(":")[1] for key, decision in decisions.items() if decision.selected)


def test_same_modality(tmp_path: Path, anatomy: Anatomy) -> None:
    rule_set = rule_set_with(tmp_path, anatomy, "modalities: same\nlookback: 5y\nmax_studies: 5\n")
    candidates = [study("1", TODAY, ("MR",)), study("2", TODAY, ("CT", "SR"))]
    decisions = decide(rule_set, candidates, OrderFacts(ordered_modality="MR"))
    assert chosen(decisions) == ["1"]
    assert decisions["a:2"].reason == "modalities CT/SR not in MR"
    unknown = decide(rule_set, candidates, OrderFacts())
    assert unknown["a:1"].reason == "modalities: same, but the ordered modality is unknown"


def test_body_part_same(tmp_path: Path, anatomy: Anatomy) -> None:
    rule_set = rule_set_with(
        tmp_path, anatomy, "modalities: [CT]\nbody_part: same\nlookback: 5y\nmax_studies: 9\n"
    )
    order = OrderFacts(body_parts=("CHEST",))
    candidates = [
        study("chest", TODAY, description="CT THORAX"),
        study("cap", TODAY, description="CT CHEST ABDOMEN PELVIS"),
        study("abdomen", TODAY, description="CT ABDOMEN"),
        study("blank", TODAY, description=""),
    ]
    decisions = decide(rule_set, candidates, order)
    assert chosen(decisions) == ["blank", "cap", "chest"]
    assert decisions["a:cap"].reason.endswith("CHESTABDPELVIS includes CHEST")
    assert decisions["a:abdomen"].reason == "body part ABDOMEN is not the same as ordered CHEST"
    assert decisions["a:blank"].reason.endswith(
        "body part not recognised in the description; unknown_body_part: include"
    )


def test_body_part_related_and_unknown_excluded(tmp_path: Path, anatomy: Anatomy) -> None:
    select = "modalities: [CT, MR, PT]\nbody_part: related\nunknown_body_part: exclude\nlookback: 5y\nmax_studies: 9\n"
    rule_set = rule_set_with(tmp_path, anatomy, select)
    order = OrderFacts(body_parts=("CHESTABDPELVIS",))
    candidates = [
        study("chest", TODAY, description="CT CHEST"),
        study("pelvis", TODAY, ("MR",), "MR PELVIS"),
        study("abdpelvis", TODAY, description="CT ABD/PELVIS"),
        study("pet", TODAY, ("PT", "CT"), "PET-CT WHOLE BODY"),
        study("head", TODAY, description="CT HEAD"),
        study("blank", TODAY, description="CT"),
    ]
    decisions = decide(rule_set, candidates, order)
    assert chosen(decisions) == ["abdpelvis", "chest", "pelvis", "pet"]
    assert decisions["a:chest"].reason.endswith("CHESTABDPELVIS includes CHEST")
    assert decisions["a:pet"].reason.endswith("WHOLEBODY and CHESTABDPELVIS both include ABDOMEN")
    assert decisions["a:abdpelvis"].reason.endswith(
        "ABDOMENPELVIS and CHESTABDPELVIS both include ABDOMEN"
    )
    assert decisions["a:head"].reason == "body part HEAD is not related to ordered CHESTABDPELVIS"
    assert decisions["a:blank"].reason == (
        "body part not recognised in description 'CT' (unknown_body_part: exclude)"
    )


def test_body_part_list_and_rule_patterns(tmp_path: Path, anatomy: Anatomy) -> None:
    extra = "body_parts:\n  KNEE: ['\\bGENOU\\b']\n"
    rule_set = rule_set_with(
        tmp_path,
        anatomy,
        "modalities: [MR]\nbody_part: [KNEE]\nlookback: 5y\nmax_studies: 9\n",
        extra,
    )
    candidates = [
        study("fr", TODAY, ("MR",), "IRM GENOU DROIT"),
        study("knee", TODAY, ("MR",), "MR KNEE"),
        study("hip", TODAY, ("MR",), "MR HIP"),
    ]
    decisions = decide(rule_set, candidates)
    assert chosen(decisions) == ["fr", "knee"]
    assert decisions["a:hip"].reason == "body part HIP is not the same as the rule's regions KNEE"


def test_related_listed_in_table(anatomy: Anatomy) -> None:
    assert (
        anatomy.relation("LSPINE", "PELVIS") == "LSPINE is related to PELVIS in the anatomy table"
    )
    assert (
        anatomy.relation("PELVIS", "LSPINE") == "PELVIS is related to LSPINE in the anatomy table"
    )
    assert anatomy.relation("KNEE", "CHEST") == ""
    assert anatomy.outermost(anatomy.find_regions("CT CHEST ABDOMEN PELVIS")) == ("CHESTABDPELVIS",)


def test_description_patterns(tmp_path: Path, anatomy: Anatomy) -> None:
    select = (
        "modalities: [CT]\nlookback: 5y\nmax_studies: 9\n"
        "include_descriptions: ['CHEST|THORAX']\nexclude_descriptions: ['(?i)scout']\n"
    )
    rule_set = rule_set_with(tmp_path, anatomy, select)
    candidates = [
        study("1", TODAY, description="CT CHEST"),
        study("2", TODAY, description="CT CHEST SCOUT"),
        study("3", TODAY, description="CT HEAD"),
    ]
    decisions = decide(rule_set, candidates)
    assert chosen(decisions) == ["1"]
    assert (
        decisions["a:2"].reason
        == "description 'CT CHEST SCOUT' matches exclude pattern /(?i)scout/"
    )
    assert (
        decisions["a:3"].reason
        == "description 'CT HEAD' matches no include pattern (/CHEST|THORAX/)"
    )


def test_reports_and_key_images(tmp_path: Path, anatomy: Anatomy) -> None:
    candidates = [
        study("img1", TODAY, ("CT",)),
        study("img2", TODAY - dt.timedelta(days=1), ("CT",)),
        study("sr", TODAY, ("SR",)),
        study("ko", TODAY, ("KO",)),
        study("old-sr", dt.date(2001, 1, 1), ("SR",)),
    ]
    without = rule_set_with(tmp_path, anatomy, "modalities: [CT]\nlookback: 5y\nmax_studies: 1\n")
    decisions = decide(without, candidates)
    assert chosen(decisions) == ["img1"]
    assert decisions["a:sr"].reason == "report-only study (SR); set include_reports to fetch it"
    assert (
        decisions["a:ko"].reason == "key-image-only study (KO); set include_key_images to fetch it"
    )

    select = "modalities: [CT]\nlookback: 5y\nmax_studies: 1\ninclude_reports: true\ninclude_key_images: true\n"
    with_both = rule_set_with(tmp_path, anatomy, select)
    decisions = decide(with_both, candidates)
    # Reports and key images do not take one of the max_studies slots.
    assert chosen(decisions) == ["img1", "ko", "sr"]
    assert decisions["a:sr"].reason == "rule r: report study, not counted in max_studies"
    assert decisions["a:img2"].reason == "beyond max_studies 1 (rank 2)"
    assert "before lookback" in decisions["a:old-sr"].reason


def test_prefer_sources(tmp_path: Path, anatomy: Anatomy) -> None:
    plain = rule_set_with(tmp_path, anatomy, "modalities: [CT]\nlookback: 5y\nmax_studies: 9\n")
    candidates = [study("1", TODAY, source="a"), study("1", TODAY, source="b")]
    decisions = decide(plain, candidates)
    assert decisions["a:1"].selected
    assert decisions["b:1"].reason == "same study is taken from a"

    select = "modalities: [CT]\nlookback: 5y\nmax_studies: 9\nprefer_sources: [b]\n"
    preferring = rule_set_with(tmp_path, anatomy, select)
    decisions = decide(preferring, candidates)
    assert decisions["b:1"].selected
    assert decisions["a:1"].reason == "same study is taken from b (preferred source)"


def test_oldest_and_most_recent(tmp_path: Path, anatomy: Anatomy) -> None:
    select = "modalities: [MG]\nlookback: 3y\nmax_studies: 3\nordering: oldest_and_most_recent\n"
    rule_set = rule_set_with(tmp_path, anatomy, select)
    dates = {"y1": 1, "y2": 2, "y2b": 2.5, "y5": 5, "y12": 12}
    candidates = [
        study(key, TODAY - dt.timedelta(days=round(years * 365)), ("MG",))
        for key, years in dates.items()
    ]
    decisions = decide(rule_set, candidates)
    assert chosen(decisions) == ["y1", "y12", "y2"]
    assert decisions["a:y12"].reason == (
        "rule r: oldest relevant study (ordering oldest_and_most_recent)"
    )
    assert decisions["a:y2b"].reason == "beyond max_studies 3 (rank 3)"
    assert "before lookback 3y" in decisions["a:y5"].reason

    # When every relevant study fits, the oldest takes no extra slot.
    few = decide(rule_set, candidates[:2])
    assert chosen(few) == ["y1", "y2"]


def test_ordered_study_kept_when_asked(tmp_path: Path, anatomy: Anatomy) -> None:
    select = "modalities: [CT]\nlookback: 5y\nmax_studies: 9\nskip_ordered_study: false\n"
    rule_set = rule_set_with(tmp_path, anatomy, select)
    order = OrderFacts(study_instance_uid="9")
    assert decide(rule_set, [study("9", TODAY)], order)["a:9"].selected
    skipping = rule_set_with(tmp_path, anatomy, "modalities: [CT]\nlookback: 5y\nmax_studies: 9\n")
    assert not decide(skipping, [study("9", TODAY)], order)["a:9"].selected


def test_plan_query(tmp_path: Path, anatomy: Anatomy) -> None:
    select = "modalities: [same, MR]\nlookback: 18m\nmax_studies: 2\ninclude_reports: true\n"
    rule_set = rule_set_with(tmp_path, anatomy, select)
    query = plan_query(rule_set.rules["r"], OrderFacts(ordered_modality="CT"), TODAY)
    assert query == StudyQuery(("CT", "MR", "SR", "DOC"), dt.date(2024, 9, 14), TODAY)
    # With the ordered modality unknown, every modality is asked for and filtered later.
    assert plan_query(rule_set.rules["r"], OrderFacts(), TODAY).modalities is None

    oldest = rule_set_with(
        tmp_path,
        anatomy,
        "modalities: [MG]\nlookback: 3y\nmax_studies: 2\nordering: oldest_and_most_recent\n",
    )
    assert plan_query(oldest.rules["r"], OrderFacts(), TODAY) == StudyQuery(("MG",), None, None)


def test_candidate_queries() -> None:
    patient = PatientIdentifier("HA-1", "HOSP_A")
    per_query = candidate_queries(patient, ["CT", "MR"], dt.date(2021, 3, 14), TODAY)
    assert [describe_query(q) for q in per_query] == [
        "StudyDate=20210314-20260314, ModalitiesInStudy=CT",
        "StudyDate=20210314-20260314, ModalitiesInStudy=MR",
    ]
    assert all(q.PatientID == "HA-1" and q.QueryRetrieveLevel == "STUDY" for q in per_query)
    [listed] = candidate_queries(patient, ["CT", "MR"], None, None, "list")
    assert describe_query(listed) == "ModalitiesInStudy=CT\\MR"
    [local] = candidate_queries(patient, ["CT"], dt.date(2021, 3, 14), TODAY, "local", "local")
    assert describe_query(local) == "all studies"
    assert "ModalitiesInStudy" in local
    assert local.ModalitiesInStudy == ""
    [open_range] = candidate_queries(patient, None, dt.date(2021, 3, 14), None)
    assert open_range.StudyDate == "20210314-"


def test_loader_checks_regions_and_sources(tmp_path: Path, anatomy: Anatomy) -> None:
    routes = tmp_path / "routes"
    rules = tmp_path / "rules"
    routes.mkdir()
    rules.mkdir()
    (routes / "r.yaml").write_text(
        ROUTES.replace("destination: local", "destination: local\n    rules: [r]")
    )
    (rules / "p.yaml").write_text(
        "procedure_codes:\n  X1: {modality: CT, body_part: THORAX}\n"
        "body_parts:\n  ELBOWS: ['ELB']\n"
        "rules:\n  - name: r\n    select:\n      modalities: CT\n      body_part: [CHEST, LEG]\n"
        "      lookback: 1y\n      max_studies: 1\n      prefer_sources: [c]\n"
        "      include_descriptions: ['(bad']\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_rule_set(routes, rules, anatomy)
    messages = [str(problem) for problem in raised.value.problems]
    assert messages[0].startswith(
        "rules/p.yaml:13: rules[0].select.include_descriptions[0]: invalid regular expression '(bad'"
    )
    (rules / "p.yaml").write_text(
        (rules / "p.yaml").read_text().replace("      include_descriptions: ['(bad']\n", "")
    )
    with pytest.raises(ConfigError) as raised:
        load_rule_set(routes, rules, anatomy)
    messages = [str(problem).split(" (")[0] for problem in raised.value.problems]
    assert messages == [
        "rules/p.yaml:2: procedure_codes.X1.body_part: unknown body region 'THORAX'",
        "rules/p.yaml:4: body_parts.ELBOWS: unknown body region 'ELBOWS'",
        "rules/p.yaml:9: rules[0].select.body_part[1]: unknown body region 'LEG'",
        "rules/p.yaml:12: rules[0].select.prefer_sources[0]: preferred source 'c' is not a source of route ris",
    ]


def test_loader_checks_regions_in_when(tmp_path: Path, anatomy: Anatomy) -> None:
    routes = tmp_path / "routes"
    rules = tmp_path / "rules"
    routes.mkdir()
    rules.mkdir()
    (routes / "r.yaml").write_text(
        ROUTES.replace("destination: local", "destination: local\n    rules: [r]")
    )
    # BRIAN is a typo: the rule would never apply, and no order would get priors.
    (rules / "p.yaml").write_text(
        "rules:\n  - name: r\n    when:\n      any:\n        - body_part: [HEAD, BRIAN]\n"
        "        - {fact: body_part, in: [CHESTS]}\n        - {fact: body_part, regex: 'BR.*'}\n"
        "    select:\n      modalities: CT\n      lookback: 1y\n      max_studies: 1\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_rule_set(routes, rules, anatomy)
    messages = [str(problem).split(" (")[0] for problem in raised.value.problems]
    assert messages == [
        "rules/p.yaml:5: rules[0].when.any[0].body_part: unknown body_part 'BRIAN'",
        "rules/p.yaml:6: rules[0].when.any[1].in: unknown body_part 'CHESTS'",
    ]
    assert "use a region of the anatomy table" in str(raised.value.problems[0])
