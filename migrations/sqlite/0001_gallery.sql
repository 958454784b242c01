-- Subjects (people) and their faces. Face images are never stored, only embeddings.

CREATE TABLE subjects (
    -- AUTOINCREMENT so a deleted subject's seq is never reused: list cursors stay stable.
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT    NOT NULL UNIQUE,          -- UUID, lowercase hyphenated
    name       TEXT    NOT NULL,
    metadata   TEXT    NOT NULL DEFAULT '{}',    -- JSON object
    created_at TEXT    NOT NULL                  -- RFC 3339 UTC, milliseconds
);

CREATE TABLE faces (
    id         TEXT    NOT NULL PRIMARY KEY,     -- UUID, lowercase hyphenated
    subject_id TEXT    NOT NULL REFERENCES subjects(id) ON DELETE CASCADE,
    embedding  BLOB    NOT NULL,                 -- little-endian f32 x dim
    dim        INTEGER NOT NULL,
    model      TEXT    NOT NULL,                 -- "name@version" of the model that made it
    created_at TEXT    NOT NULL
);

-- Cascade deletes and per-subject listings look faces up by subject.
CREATE INDEX faces_subject ON faces(subject_id);
-- Start-up counts faces of the running model to size the index before loading it.
CREATE INDEX faces_model ON faces(model);
