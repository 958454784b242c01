-- Subjects (people) and their faces, as in migrations/sqlite/0001_gallery.sql, plus the change
-- log through which replicas keep their in-memory indexes in step. Face images are never
-- stored, only embeddings.

CREATE TABLE subjects (
    -- A sequence, so a deleted subject's seq is never reused: list cursors stay stable.
    seq        BIGSERIAL   PRIMARY KEY,
    id         UUID        NOT NULL UNIQUE,
    name       TEXT        NOT NULL,
    metadata   TEXT        NOT NULL DEFAULT '{}',    -- JSON object, kept byte for byte
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE faces (
    -- Creation order of faces within a subject (SQLite uses its rowid).
    seq        BIGSERIAL   NOT NULL,
    id         UUID        NOT NULL PRIMARY KEY,
    subject_id UUID        NOT NULL REFERENCES subjects(id) ON DELETE CASCADE,
    embedding  BYTEA       NOT NULL,                 -- little-endian f32 x dim
    dim        INTEGER     NOT NULL,
    model      TEXT        NOT NULL,                 -- "name@version" of the model that made it
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX faces_subject ON faces(subject_id);
CREATE INDEX faces_model ON faces(model);

-- One row per committed write. `seq` is taken under a transaction-scoped advisory lock held
-- until commit, so sequence order is commit order: a replica that has applied seq N has seen
-- every write committed before N, and reading `seq > N` never skips a row that commits late.
CREATE SEQUENCE change_log_seq;
CREATE TABLE change_log (
    seq        BIGINT      PRIMARY KEY,
    op         TEXT        NOT NULL CHECK (op IN ('subject_added', 'subject_deleted', 'face_added', 'face_deleted')),
    subject_id UUID        NOT NULL,
    face_id    UUID,
    model      TEXT,                                 -- the face's model, for face ops
    at         TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Highest sequence pruned from the log: a replica whose applied sequence is below it has
-- missed rows that are gone, and reloads the whole gallery instead.
CREATE TABLE change_log_floor (
    one         BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    pruned_upto BIGINT  NOT NULL
);
INSERT INTO change_log_floor (pruned_upto) VALUES (0);

-- Each running replica's progress; rows are pruned once every live replica has passed them.
CREATE TABLE replicas (
    id          UUID        PRIMARY KEY,
    applied_seq BIGINT      NOT NULL,
    seen_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
