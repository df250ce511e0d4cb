"""The modality codes that rules may name: DICOM's, and HL7's diagnostic service sections.

A prior's modalities (select.modalities) and a procedure code's modality are
compared with the Modality and ModalitiesInStudy of DICOM studies, so they
must be DICOM codes. An ordered modality comes from OBR-24, which some RIS
fill with an HL7 Table 0074 code (RAD, NMR) instead, so a condition on it may
name either kind.
"""

from __future__ import annotations

# DICOM PS3.3 C.7.3.1.1.1 Modality, defined terms, with the retired ones still
# found in older archives.
DICOM_MODALITIES = frozenset(
    {
        *("ANN", "AR", "ASMT", "AU", "BDUS", "BI", "BMD", "CFM", "CR", "CT", "CTPROTOCOL"),
        *("DG", "DMS", "DOC", "DX", "ECG", "EEG", "EMG", "EOG", "EPS", "ES", "FID", "GM"),
        *("HC", "HD", "IO", "IOL", "IVOCT", "IVUS", "KER", "KO", "LEN", "LS", "M3D", "MG"),
        *("MR", "NM", "OAM", "OCT", "OP", "OPM", "OPT", "OPTBSV", "OPTENF", "OPV", "OSS"),
        *("OT", "PA", "PLAN", "POS", "PR", "PT", "PX", "REG", "RESP", "RF", "RG", "RTDOSE"),
        *("RTIMAGE", "RTINTENT", "RTPLAN", "RTRAD", "RTRECORD", "RTSEGANN", "RTSTRUCT"),
        *("RWV", "SEG", "SM", "SMR", "SR", "SRF", "STAIN", "TEXTUREMAP", "TG", "US", "VA"),
        *("XA", "XAPROTOCOL", "XC"),
        # Retired terms.
        *("AS", "CD", "CF", "CP", "CS", "DD", "DF", "DM", "DS", "EC", "FA", "FS", "LP"),
        *("MA", "MS", "OPR", "ST", "VF"),
    }
)

# HL7 Table 0074, diagnostic service section ID (OBR-24).
HL7_SERVICE_SECTIONS = frozenset(
    {
        *("AU", "BG", "BLB", "CG", "CH", "CP", "CT", "CTH", "CUS", "EC", "EN", "GE", "HM"),
        *("ICU", "IMG", "IMM", "LAB", "MB", "MCB", "MYC", "NMR", "NMS", "NRS", "OSL", "OT"),
        *("OTH", "OUS", "PAR", "PAT", "PF", "PHR", "PHY", "PT", "RAD", "RC", "RT", "RUS"),
        *("RX", "SP", "SR", "TX", "URN", "VR", "VUS", "XRC"),
    }
)

ORDERED_MODALITIES = DICOM_MODALITIES | HL7_SERVICE_SECTIONS

DICOM_HINT = (
    "use a DICOM modality code (PS3.3 C.7.3.1.1.1) such as CT, MR, CR, DX, US, MG, NM,"
    " PT, XA, RF, SR or KO"
)
ORDERED_HINT = f"{DICOM_HINT}, or an HL7 Table 0074 code of OBR-24 such as RAD or NMR"
