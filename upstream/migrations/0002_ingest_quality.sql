-- 0002_ingest_quality: outlier scores on ingest records, and the quarantine for review.
-- Applied once, in a transaction, by `python -m upstream db init`.
-- Never edit this file once applied anywhere: add a new numbered migration instead.

-- The gateway's outlier model scores each record; both stay NULL for plain JSON/NDJSON.
ALTER TABLE ingest_records ADD COLUMN score DOUBLE;
ALTER TABLE ingest_records ADD COLUMN model VARCHAR;

-- Records the gateway accepted but flagged: kept aside, out of ingest_records (and so out
-- of statistics and training data) until someone accepts or discards them.
CREATE SEQUENCE ingest_quarantine_seq START 1;
CREATE TABLE ingest_quarantine (
    id           BIGINT PRIMARY KEY DEFAULT nextval('ingest_quarantine_seq'),
    stream       VARCHAR NOT NULL,
    batch_id     UUID NOT NULL,
    record_index INTEGER NOT NULL,
    record       JSON NOT NULL,
    score        DOUBLE,
    model        VARCHAR,
    flags        JSON NOT NULL,
    received_at  TIMESTAMP NOT NULL DEFAULT CAST(now() AT TIME ZONE 'UTC' AS TIMESTAMP),
    received_by  VARCHAR,
    status       VARCHAR NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'accepted', 'discarded')),
    reviewed_by  VARCHAR,
    reviewed_at  TIMESTAMP,
    review_note  VARCHAR
);

-- No index on (stream, status) on purpose: DuckDB turns an UPDATE of an indexed column
-- into a delete and insert, which its over-eager key checks can refuse within one
-- transaction; a review queue is small enough to scan.
