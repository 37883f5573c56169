-- 0003_archive_log: the record of committed archives (upstream/archive/).
-- Applied once, in a transaction, by `python -m upstream db init`.
-- Never edit this file once applied anywhere: add a new numbered migration instead.

-- One row per Parquet file whose rows were deleted, written in the transaction that deleted
-- them: a file under the archive directory without its row here was left by an interrupted
-- run, and its rows are still in their table.
CREATE TABLE archive_log (
    table_name   VARCHAR NOT NULL,
    file         VARCHAR NOT NULL,
    run_id       VARCHAR NOT NULL,
    rows         BIGINT NOT NULL,
    sha256       VARCHAR NOT NULL,
    checksum     VARCHAR NOT NULL,
    committed_at TIMESTAMP NOT NULL,
    PRIMARY KEY (table_name, file)
);
