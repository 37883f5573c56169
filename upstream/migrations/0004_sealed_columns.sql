-- 0004_sealed_columns: room for sensitive values sealed with AES-256-GCM (upstream/sealing.py).
-- Applied once, in a transaction, by `python -m upstream db init`.
-- Never edit this file once applied anywhere: add a new numbered migration instead.
--
-- Employees' name, email and title and tickets' title and description keep their VARCHAR
-- columns: a sealed value is text. A sealed email differs every time it is written, so its
-- uniqueness and the ?email= filter move to email_digest, an HMAC of the address under the
-- ring's index key. DuckDB cannot drop a UNIQUE constraint, so the table is rebuilt; rows
-- already there keep their plaintext until the service's first start seals them and fills
-- email_digest (the column is nullable for that pass only; the service writes it always).
CREATE TABLE employees_sealed (
    id            BIGINT PRIMARY KEY DEFAULT nextval('employees_id_seq'),
    name          VARCHAR NOT NULL,
    email         VARCHAR NOT NULL,
    email_digest  VARCHAR UNIQUE,
    department_id BIGINT,
    title         VARCHAR,
    manager_id    BIGINT,
    created_at    TIMESTAMP NOT NULL DEFAULT CAST(now() AT TIME ZONE 'UTC' AS TIMESTAMP),
    updated_at    TIMESTAMP NOT NULL DEFAULT CAST(now() AT TIME ZONE 'UTC' AS TIMESTAMP)
);
INSERT INTO employees_sealed
    (id, name, email, department_id, title, manager_id, created_at, updated_at)
SELECT id, name, email, department_id, title, manager_id, created_at, updated_at
FROM employees;
DROP TABLE employees;
ALTER TABLE employees_sealed RENAME TO employees;
CREATE INDEX employees_department_id_idx ON employees (department_id);
CREATE INDEX employees_manager_id_idx ON employees (manager_id);

-- A quarantined record is sealed whole, so it is no longer JSON to the database.
ALTER TABLE ingest_quarantine ALTER COLUMN record SET DATA TYPE VARCHAR;
