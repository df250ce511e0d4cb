"""Query/Retrieve information models and levels (PS3.4 C.6.1 and C.6.2).

Patient Root has PATIENT, STUDY, SERIES and IMAGE levels; Study Root has no
PATIENT level and keeps patient attributes at STUDY level.
"""

from __future__ import annotations

import enum

from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)


class Level(enum.IntEnum):
    PATIENT = 0
    STUDY = 1
    SERIES = 2
    IMAGE = 3


class Model(enum.Enum):
    PATIENT_ROOT = "patient root"
    STUDY_ROOT = "study root"

    @property
    def levels(self) -> tuple[Level, ...]:
        if self is Model.PATIENT_ROOT:
            return (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)
        return (Level.STUDY, Level.SERIES, Level.IMAGE)

    @property
    def find_sop_class(self) -> str:
        if self is Model.PATIENT_ROOT:
            return str(PatientRootQueryRetrieveInformationModelFind)
        return str(StudyRootQueryRetrieveInformationModelFind)

    def level_of(self, keyword: str, default: Level) -> Level:
        """Return the level an attribute belongs to in this model; `default` when unknown."""
        level = ATTRIBUTE_LEVELS.get(keyword, default)
        if self is Model.STUDY_ROOT and level is Level.PATIENT:
            return Level.STUDY
        return level


FIND_MODELS = {
    str(PatientRootQueryRetrieveInformationModelFind): Model.PATIENT_ROOT,
    str(StudyRootQueryRetrieveInformationModelFind): Model.STUDY_ROOT,
}
MOVE_MODELS = {
    str(PatientRootQueryRetrieveInformationModelMove): Model.PATIENT_ROOT,
    str(StudyRootQueryRetrieveInformationModelMove): Model.STUDY_ROOT,
}
GET_MODELS = {
    str(PatientRootQueryRetrieveInformationModelGet): Model.PATIENT_ROOT,
    str(StudyRootQueryRetrieveInformationModelGet): Model.STUDY_ROOT,
}

UNIQUE_KEYS = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}

# The attributes of the Query/Retrieve models (PS3.4 C.6.1.1 and C.6.2.1) by level.
# An attribute not listed here is treated as belonging to the level of the query.
_PATIENT = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "EthnicGroup",
    "PatientComments",
    "NumberOfPatientRelatedStudies",
    "NumberOfPatientRelatedSeries",
    "NumberOfPatientRelatedInstances",
)
_STUDY = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyID",
    "ReferringPhysicianName",
    "StudyDescription",
    "ProcedureCodeSequence",
    "NameOfPhysiciansReadingStudy",
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "Occupation",
    "AdditionalPatientHistory",
    "OtherStudyNumbers",
    "ModalitiesInStudy",
    "SOPClassesInStudy",
    "AnatomicRegionsInStudyCodeSequence",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "InstitutionName",
)
_SERIES = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
    "Laterality",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "RequestAttributesSequence",
    "NumberOfSeriesRelatedInstances",
)
_IMAGE = (
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "ContentDate",
    "ContentTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "ImageType",
    "AlternateRepresentationSequence",
    "AvailableTransferSyntaxUID",
)
ATTRIBUTE_LEVELS: dict[str, Level] = {
    **{keyword: Level.PATIENT for keyword in _PATIENT},
    **{keyword: Level.STUDY for keyword in _STUDY},
    **{keyword: Level.SERIES for keyword in _SERIES},
    **{keyword: Level.IMAGE for keyword in _IMAGE},
}

# Attributes that describe the response, not the entity; never matched.
RESPONSE_ATTRIBUTES = frozenset(
    {
        "QueryRetrieveLevel",
        "SpecificCharacterSet",
        "RetrieveAETitle",
        "InstanceAvailability",
        "TimezoneOffsetFromUTC",
        "StorageMediaFileSetID",
        "StorageMediaFileSetUID",
        "QueryRetrieveView",
    }
)
