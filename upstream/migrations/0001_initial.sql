-- 0001_initial: departments, employees, tickets and ingest records.
-- Never edit this file once applied anywhere: add a new numbered migration instead.
--
-- No FOREIGN KEY constraints on purpose: DuckDB refuses any UPDATE that touches a
-- uniquely indexed column of a row another table references (its documented foreign-key
-- limitation), which would break PUT on every department with employees. The service
-- checks references itself, on its single writer thread (upstream/store/resources.py).

CREATE SEQUENCE departments_id_seq START 1;
CREATE TABLE departments (
    id         BIGINT PRIMARY KEY DEFAULT nextval('departments_id_seq'),
    name       VARCHAR NOT NULL UNIQUE,
    created_at TIMESTAMP NOT NULL DEFAULT CAST(now() AT TIME ZONE 'UTC' AS TIMESTAMP)
);

CREATE SEQUENCE employees_id_seq START 1;
CREATE TABLE employees (
    id            BIGINT PRIMARY KEY DEFAULT nextval('employees_id_seq'),
    name          VARCHAR NOT NULL,
    email         VARCHAR NOT NULL UNIQUE,
    department_id BIGINT,
    title         VARCHAR,
    manager_id    BIGINT,
    created_at    TIMESTAMP NOT NULL DEFAULT CAST(now() AT TIME ZONE 'UTC' AS TIMESTAMP),
    updated_at    TIMESTAMP NOT NULL DEFAULT CAST(now() AT TIME ZONE 'UTC' AS TIMESTAMP)
);
CREATE INDEX employees_department_id_idx ON employees (department_id);
CREATE INDEX employees_manager_id_idx ON employees (manager_id);

CREATE SEQUENCE tickets_id_seq START 1;
CREATE TABLE tickets (
    id            BIGINT PRIMARY KEY DEFAULT nextval('tickets_id_seq'),
    title         VARCHAR NOT NULL,
    description   VARCHAR,
    status        VARCHAR NOT NULL DEFAULT 'open'
                  CHECK (status IN ('open', 'in_progress', 'resolved', 'closed')),
    priority      VARCHAR NOT NULL DEFAULT 'medium'
                  CHECK (priority IN ('low', 'medium', 'high', 'critical')),
    department_id BIGINT,
    assignee_id   BIGINT,
    created_by    VARCHAR,
    created_at    TIMESTAMP NOT NULL DEFAULT CAST(now() AT TIME ZONE 'UTC' AS TIMESTAMP),
    updated_at    TIMESTAMP NOT NULL DEFAULT CAST(now() AT TIME ZONE 'UTC' AS TIMESTAMP)
);
CREATE INDEX tickets_status_idx ON tickets (status);
CREATE INDEX tickets_priority_idx ON tickets (priority);
CREATE INDEX tickets_department_id_idx ON tickets (department_id);
CREATE INDEX tickets_assignee_id_idx ON tickets (assignee_id);
CREATE INDEX tickets_created_by_idx ON tickets (created_by);

-- batch_seq orders batches newest-first without trusting clock resolution.
CREATE SEQUENCE ingest_batches_seq START 1;
CREATE TABLE ingest_records (
    stream       VARCHAR NOT NULL,
    batch_id     UUID NOT NULL,
    batch_seq    BIGINT NOT NULL,
    record_index INTEGER NOT NULL,
    record       JSON NOT NULL,
    received_at  TIMESTAMP NOT NULL DEFAULT CAST(now() AT TIME ZONE 'UTC' AS TIMESTAMP),
    received_by  VARCHAR
);
