"""SQLite tables of the identity module, created by the job store with its own tables.

identity_patients   the local patient record: demographics from ADT^A01/A04/A08
identity_learned    cross-references learned from ADT messages (PID-3 with several issuers)
identity_merges     ADT^A40 merges: each retired local ID and the ID it lives on as
identity_cache      answers of network identity sources (PIX, PDQ, PIXm) until they expire
identity_accepted   remote patients an operator accepted for a quarantined job
"""

IDENTITY_SCHEMA = """
CREATE TABLE IF NOT EXISTS identity_patients (
    patient_id TEXT NOT NULL,
    issuer TEXT NOT NULL,
    demographics TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    message_control_id TEXT NOT NULL,
    PRIMARY KEY (patient_id, issuer)
);
CREATE TABLE IF NOT EXISTS identity_learned (
    local_id TEXT NOT NULL,
    local_issuer TEXT NOT NULL,
    domain TEXT NOT NULL,
    remote_id TEXT NOT NULL,
    learned_at TEXT NOT NULL,
    message_control_id TEXT NOT NULL,
    PRIMARY KEY (local_id, local_issuer, domain)
);
CREATE UNIQUE INDEX IF NOT EXISTS identity_learned_by_remote
    ON identity_learned (domain, remote_id);
CREATE TABLE IF NOT EXISTS identity_merges (
    retired_id TEXT NOT NULL,
    retired_issuer TEXT NOT NULL,
    surviving_id TEXT NOT NULL,
    surviving_issuer TEXT NOT NULL,
    merged_at TEXT NOT NULL,
    message_control_id TEXT NOT NULL,
    PRIMARY KEY (retired_id, retired_issuer)
);
CREATE INDEX IF NOT EXISTS identity_merges_by_surviving
    ON identity_merges (surviving_id, surviving_issuer);
CREATE TABLE IF NOT EXISTS identity_cache (
    query_id TEXT NOT NULL,
    query_issuer TEXT NOT NULL,
    domain TEXT NOT NULL,
    source TEXT NOT NULL,
    answer_id TEXT,
    detail TEXT NOT NULL,
    stored_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    PRIMARY KEY (query_id, query_issuer, domain, source)
);
CREATE TABLE IF NOT EXISTS identity_accepted (
    job_id INTEGER NOT NULL,
    remote_id TEXT NOT NULL,
    remote_issuer TEXT NOT NULL,
    accepted_at TEXT NOT NULL,
    PRIMARY KEY (job_id, remote_id, remote_issuer)
);
"""
