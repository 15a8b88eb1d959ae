-- QFLARE schema 1, SQLite: the PostgreSQL reference schema (../postgres/0001_initial.sql) in
-- SQLite's terms. STRICT tables refuse values of the wrong type; times are INTEGER microseconds
-- since the Unix epoch, UTC, which keeps them exact, sortable and indexable. There are no roles
-- and no row-level security: an embedded database belongs to the one process that opens it.

CREATE TABLE tenants (
    id          TEXT PRIMARY KEY NOT NULL
                CHECK (length(id) BETWEEN 1 AND 64 AND id NOT GLOB '*[^A-Za-z0-9._-]*'),
    name        TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 256),
    created_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE devices (
    tenant_id          TEXT NOT NULL REFERENCES tenants (id),
    device_id          TEXT NOT NULL
                       CHECK (length(device_id) BETWEEN 1 AND 64
                              AND device_id NOT GLOB '*[^A-Za-z0-9._-]*'),
    state              TEXT NOT NULL
                       CHECK (state IN ('enrolled', 'active', 'quarantined', 'revoked')),
    state_reason       TEXT CHECK (length(state_reason) <= 4096),
    created_at         INTEGER NOT NULL,
    last_seen          INTEGER,
    failure_count      INTEGER NOT NULL DEFAULT 0 CHECK (failure_count >= 0),
    last_handshake_ts  INTEGER CHECK (last_handshake_ts >= 0),
    PRIMARY KEY (tenant_id, device_id)
) STRICT;
CREATE INDEX devices_by_state ON devices (tenant_id, state, device_id);

CREATE TABLE device_keys (
    tenant_id   TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    version     INTEGER NOT NULL CHECK (version >= 1),
    algorithm   TEXT NOT NULL CHECK (length(algorithm) BETWEEN 1 AND 128),
    public_key  BLOB NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('active', 'retired')),
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, device_id, version),
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, device_id)
) STRICT;
CREATE UNIQUE INDEX device_keys_one_active ON device_keys (tenant_id, device_id)
    WHERE state = 'active';

CREATE TABLE enrollment_tokens (
    tenant_id       TEXT NOT NULL REFERENCES tenants (id),
    token_id        TEXT NOT NULL
                    CHECK (length(token_id) BETWEEN 1 AND 64
                           AND token_id NOT GLOB '*[^A-Za-z0-9._-]*'),
    token_hash      BLOB NOT NULL CHECK (length(token_hash) BETWEEN 16 AND 64),
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    used_at         INTEGER,
    used_by_device  TEXT,
    PRIMARY KEY (tenant_id, token_id),
    CHECK ((used_at IS NULL) = (used_by_device IS NULL))
) STRICT;
CREATE UNIQUE INDEX enrollment_tokens_by_hash ON enrollment_tokens (token_hash);
CREATE INDEX enrollment_tokens_expiry ON enrollment_tokens (expires_at);

CREATE TABLE server_keys (
    tenant_id          TEXT NOT NULL REFERENCES tenants (id),
    key_id             TEXT NOT NULL
                       CHECK (length(key_id) BETWEEN 1 AND 64
                              AND key_id NOT GLOB '*[^A-Za-z0-9._-]*'),
    purpose            TEXT NOT NULL CHECK (purpose IN ('kem-static', 'audit-signing', 'biscuit')),
    algorithm          TEXT NOT NULL CHECK (length(algorithm) BETWEEN 1 AND 128),
    version            INTEGER NOT NULL CHECK (version >= 1),
    state              TEXT NOT NULL CHECK (state IN ('active', 'retiring', 'retired', 'revoked')),
    public_key         BLOB NOT NULL,
    encrypted_private  BLOB NOT NULL,
    created_at         INTEGER NOT NULL,
    activated_at       INTEGER,
    retire_after       INTEGER,
    PRIMARY KEY (tenant_id, key_id),
    CONSTRAINT server_keys_version UNIQUE (tenant_id, purpose, version)
) STRICT;
CREATE UNIQUE INDEX server_keys_one_active ON server_keys (tenant_id, purpose)
    WHERE state = 'active';

CREATE TABLE sessions (
    tenant_id              TEXT NOT NULL,
    session_id             BLOB NOT NULL CHECK (length(session_id) = 16),
    device_id              TEXT NOT NULL,
    state                  TEXT NOT NULL
                           CHECK (state IN ('pending', 'active', 'expired', 'revoked')),
    suite                  INTEGER NOT NULL CHECK (suite BETWEEN 0 AND 65535),
    epoch                  INTEGER NOT NULL CHECK (epoch >= 0),
    encrypted_chain_state  BLOB NOT NULL,
    replay_window          BLOB NOT NULL,
    messages_sent          INTEGER NOT NULL DEFAULT 0 CHECK (messages_sent >= 0),
    messages_received      INTEGER NOT NULL DEFAULT 0 CHECK (messages_received >= 0),
    bytes_sent             INTEGER NOT NULL DEFAULT 0 CHECK (bytes_sent >= 0),
    bytes_received         INTEGER NOT NULL DEFAULT 0 CHECK (bytes_received >= 0),
    created_at             INTEGER NOT NULL,
    expires_at             INTEGER NOT NULL,
    updated_at             INTEGER NOT NULL,
    version                INTEGER NOT NULL DEFAULT 0 CHECK (version >= 0),
    PRIMARY KEY (tenant_id, session_id),
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, device_id)
) STRICT;
CREATE INDEX sessions_by_device ON sessions (tenant_id, device_id, created_at);
CREATE INDEX sessions_expiry ON sessions (expires_at);

CREATE TABLE handshake_nonces (
    tenant_id   TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    nonce       BLOB NOT NULL CHECK (length(nonce) BETWEEN 16 AND 64),
    device_ts   INTEGER NOT NULL CHECK (device_ts >= 0),
    expires_at  INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, device_id, nonce),
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, device_id)
) STRICT;
CREATE INDEX handshake_nonces_expiry ON handshake_nonces (expires_at);

CREATE TABLE audit_entries (
    idx        INTEGER PRIMARY KEY CHECK (idx >= 0),
    ts         INTEGER NOT NULL,
    kind       TEXT NOT NULL CHECK (length(kind) BETWEEN 1 AND 64),
    payload    BLOB NOT NULL,
    leaf_hash  BLOB NOT NULL CHECK (length(leaf_hash) BETWEEN 16 AND 64)
) STRICT;

-- Append-only, as on PostgreSQL. Anyone holding the file can still rewrite it; the Merkle
-- tree and its signed checkpoints are what make such an edit detectable.
CREATE TRIGGER audit_entries_no_update BEFORE UPDATE ON audit_entries
BEGIN
    SELECT RAISE(ABORT, 'audit_entries is append-only');
END;
CREATE TRIGGER audit_entries_no_delete BEFORE DELETE ON audit_entries
BEGIN
    SELECT RAISE(ABORT, 'audit_entries is append-only');
END;

CREATE TABLE security_events (
    id          INTEGER PRIMARY KEY,
    ts          INTEGER NOT NULL,
    tenant_id   TEXT NOT NULL,
    device_id   TEXT CHECK (length(device_id) <= 256),
    source      TEXT CHECK (length(source) <= 256),
    event_type  TEXT NOT NULL CHECK (length(event_type) BETWEEN 1 AND 128),
    severity    INTEGER NOT NULL CHECK (severity BETWEEN 0 AND 1000),
    detail      TEXT NOT NULL DEFAULT '{}'
) STRICT;
CREATE INDEX security_events_by_tenant ON security_events (tenant_id, id);
CREATE INDEX security_events_by_device ON security_events (tenant_id, device_id, id);
CREATE INDEX security_events_by_time ON security_events (tenant_id, ts);

CREATE TABLE admin_tokens (
    token_hash  BLOB PRIMARY KEY NOT NULL CHECK (length(token_hash) BETWEEN 16 AND 64),
    name        TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 256),
    scopes      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked     INTEGER NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1))
) STRICT;
