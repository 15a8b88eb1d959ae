-- QFLARE schema 1, PostgreSQL (the reference schema; docs/STORAGE.md explains it).
-- Runs as the schema owner, with search_path set to the QFLARE schema and pg_temp.
-- The application connects as (or SET ROLE to) qflare_app, which is subject to row-level
-- security: it sees and writes only the rows of the tenant named by app.tenant_id, which the
-- store sets with set_config(..., true) at the start of every transaction.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'qflare_app') THEN
        -- NOLOGIN: a login role is granted membership (or the DBA adds LOGIN); it has no password
        -- here, so this migration never puts a credential in the database.
        CREATE ROLE qflare_app NOLOGIN;
    END IF;
END
$$;

-- The wire codec's identifier rule, enforced again by the database.
CREATE DOMAIN ident AS text CHECK (VALUE ~ '^[A-Za-z0-9._-]{1,64}$');

CREATE TABLE tenants (
    id          ident PRIMARY KEY,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 256),
    created_at  timestamptz NOT NULL
);

CREATE TABLE devices (
    tenant_id          ident NOT NULL REFERENCES tenants (id),
    device_id          ident NOT NULL,
    state              text NOT NULL
                       CHECK (state IN ('enrolled', 'active', 'quarantined', 'revoked')),
    state_reason       text CHECK (length(state_reason) <= 4096),
    created_at         timestamptz NOT NULL,
    last_seen          timestamptz,
    failure_count      bigint NOT NULL DEFAULT 0 CHECK (failure_count >= 0),
    last_handshake_ts  bigint CHECK (last_handshake_ts >= 0),
    PRIMARY KEY (tenant_id, device_id)
);
CREATE INDEX devices_by_state ON devices (tenant_id, state, device_id);

CREATE TABLE device_keys (
    tenant_id   ident NOT NULL,
    device_id   ident NOT NULL,
    version     bigint NOT NULL CHECK (version >= 1),
    algorithm   text NOT NULL CHECK (length(algorithm) BETWEEN 1 AND 128),
    public_key  bytea NOT NULL,
    state       text NOT NULL CHECK (state IN ('active', 'retired')),
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, device_id, version),
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, device_id)
);
-- At most one active identity key per device, whatever the application does.
CREATE UNIQUE INDEX device_keys_one_active ON device_keys (tenant_id, device_id)
    WHERE state = 'active';

CREATE TABLE enrollment_tokens (
    tenant_id       ident NOT NULL REFERENCES tenants (id),
    token_id        ident NOT NULL,
    token_hash      bytea NOT NULL CHECK (length(token_hash) BETWEEN 16 AND 64),
    created_at      timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    used_at         timestamptz,
    used_by_device  ident,
    PRIMARY KEY (tenant_id, token_id),
    CHECK ((used_at IS NULL) = (used_by_device IS NULL))
);
CREATE UNIQUE INDEX enrollment_tokens_by_hash ON enrollment_tokens (token_hash);
CREATE INDEX enrollment_tokens_expiry ON enrollment_tokens (expires_at);

CREATE TABLE server_keys (
    tenant_id          ident NOT NULL REFERENCES tenants (id),
    key_id             ident NOT NULL,
    purpose            text NOT NULL CHECK (purpose IN ('kem-static', 'audit-signing', 'biscuit')),
    algorithm          text NOT NULL CHECK (length(algorithm) BETWEEN 1 AND 128),
    version            bigint NOT NULL CHECK (version >= 1),
    state              text NOT NULL CHECK (state IN ('active', 'retiring', 'retired', 'revoked')),
    public_key         bytea NOT NULL,
    encrypted_private  bytea NOT NULL,
    created_at         timestamptz NOT NULL,
    activated_at       timestamptz,
    retire_after       timestamptz,
    PRIMARY KEY (tenant_id, key_id),
    CONSTRAINT server_keys_version UNIQUE (tenant_id, purpose, version)
);
-- Exactly one active key per tenant and purpose: a rotation that lost a race fails here
-- instead of leaving two keys active.
CREATE UNIQUE INDEX server_keys_one_active ON server_keys (tenant_id, purpose)
    WHERE state = 'active';

CREATE TABLE sessions (
    tenant_id              ident NOT NULL,
    session_id             bytea NOT NULL CHECK (length(session_id) = 16),
    device_id              ident NOT NULL,
    state                  text NOT NULL CHECK (state IN ('pending', 'active', 'expired', 'revoked')),
    suite                  integer NOT NULL CHECK (suite BETWEEN 0 AND 65535),
    epoch                  bigint NOT NULL CHECK (epoch >= 0),
    encrypted_chain_state  bytea NOT NULL,
    replay_window          bytea NOT NULL,
    messages_sent          bigint NOT NULL DEFAULT 0 CHECK (messages_sent >= 0),
    messages_received      bigint NOT NULL DEFAULT 0 CHECK (messages_received >= 0),
    bytes_sent             bigint NOT NULL DEFAULT 0 CHECK (bytes_sent >= 0),
    bytes_received         bigint NOT NULL DEFAULT 0 CHECK (bytes_received >= 0),
    created_at             timestamptz NOT NULL,
    expires_at             timestamptz NOT NULL,
    updated_at             timestamptz NOT NULL,
    version                bigint NOT NULL DEFAULT 0 CHECK (version >= 0),
    PRIMARY KEY (tenant_id, session_id),
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, device_id)
);
CREATE INDEX sessions_by_device ON sessions (tenant_id, device_id, created_at);
CREATE INDEX sessions_expiry ON sessions (expires_at);

CREATE TABLE handshake_nonces (
    tenant_id   ident NOT NULL,
    device_id   ident NOT NULL,
    nonce       bytea NOT NULL CHECK (length(nonce) BETWEEN 16 AND 64),
    device_ts   bigint NOT NULL CHECK (device_ts >= 0),
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, device_id, nonce),
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, device_id)
);
CREATE INDEX handshake_nonces_expiry ON handshake_nonces (expires_at);

-- The Merkle audit log. Not per tenant: one log, one tree, one sequence of checkpoints.
CREATE TABLE audit_entries (
    idx        bigint PRIMARY KEY CHECK (idx >= 0),
    ts         timestamptz NOT NULL,
    kind       text NOT NULL CHECK (length(kind) BETWEEN 1 AND 64),
    payload    bytea NOT NULL,
    leaf_hash  bytea NOT NULL CHECK (length(leaf_hash) BETWEEN 16 AND 64)
);

-- Append-only even for the owner (qflare_app is not even granted UPDATE or DELETE): an edit
-- needs a superuser to drop this trigger first, which is itself visible.
CREATE FUNCTION audit_entries_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_entries is append-only' USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_entries_no_change BEFORE UPDATE OR DELETE ON audit_entries
    FOR EACH ROW EXECUTE FUNCTION audit_entries_append_only();
CREATE TRIGGER audit_entries_no_truncate BEFORE TRUNCATE ON audit_entries
    FOR EACH STATEMENT EXECUTE FUNCTION audit_entries_append_only();

CREATE TABLE security_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ts          timestamptz NOT NULL,
    tenant_id   ident NOT NULL,
    device_id   text CHECK (length(device_id) <= 256),
    source      text CHECK (length(source) <= 256),
    event_type  text NOT NULL CHECK (length(event_type) BETWEEN 1 AND 128),
    severity    integer NOT NULL CHECK (severity BETWEEN 0 AND 1000),
    detail      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX security_events_by_tenant ON security_events (tenant_id, id);
CREATE INDEX security_events_by_device ON security_events (tenant_id, device_id, id);
CREATE INDEX security_events_by_time ON security_events (tenant_id, ts);

CREATE TABLE admin_tokens (
    token_hash  bytea PRIMARY KEY CHECK (length(token_hash) BETWEEN 16 AND 64),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 256),
    scopes      text NOT NULL,
    created_at  timestamptz NOT NULL,
    revoked     boolean NOT NULL DEFAULT false
);

-- Row-level security. No policy names a role, so every role except the owner and superusers
-- is confined; a role that was never told its tenant (app.tenant_id unset or '') sees nothing.
ALTER TABLE tenants ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tenants
    USING (id = current_setting('app.tenant_id', true))
    WITH CHECK (id = current_setting('app.tenant_id', true));

ALTER TABLE devices ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON devices
    USING (tenant_id = current_setting('app.tenant_id', true))
    WITH CHECK (tenant_id = current_setting('app.tenant_id', true));

ALTER TABLE device_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON device_keys
    USING (tenant_id = current_setting('app.tenant_id', true))
    WITH CHECK (tenant_id = current_setting('app.tenant_id', true));

ALTER TABLE enrollment_tokens ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON enrollment_tokens
    USING (tenant_id = current_setting('app.tenant_id', true))
    WITH CHECK (tenant_id = current_setting('app.tenant_id', true));

ALTER TABLE server_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON server_keys
    USING (tenant_id = current_setting('app.tenant_id', true))
    WITH CHECK (tenant_id = current_setting('app.tenant_id', true));

ALTER TABLE sessions ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON sessions
    USING (tenant_id = current_setting('app.tenant_id', true))
    WITH CHECK (tenant_id = current_setting('app.tenant_id', true));

ALTER TABLE handshake_nonces ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON handshake_nonces
    USING (tenant_id = current_setting('app.tenant_id', true))
    WITH CHECK (tenant_id = current_setting('app.tenant_id', true));

ALTER TABLE security_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON security_events
    USING (tenant_id = current_setting('app.tenant_id', true))
    WITH CHECK (tenant_id = current_setting('app.tenant_id', true));

-- Expired-row cleanup spans every tenant, which qflare_app cannot see at once. These functions
-- run as the owner but can only delete rows that expired before p_now, in bounded batches, so
-- they widen nothing else. The batch is picked through the expiry index and deleted by row
-- address (a TID scan, whatever the table's size); the row lock taken by FOR UPDATE keeps the
-- address valid until the delete. SKIP LOCKED: a row that live traffic is updating waits for
-- the next run instead of blocking it.
CREATE FUNCTION delete_expired_sessions(p_now timestamptz, p_limit integer) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path FROM CURRENT AS $$
    WITH gone AS (
        DELETE FROM sessions WHERE ctid = ANY (ARRAY(
            SELECT ctid FROM sessions WHERE expires_at <= p_now
            ORDER BY expires_at LIMIT p_limit FOR UPDATE SKIP LOCKED
        ))
        RETURNING 1
    )
    SELECT count(*) FROM gone
$$;

CREATE FUNCTION delete_expired_nonces(p_now timestamptz, p_limit integer) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path FROM CURRENT AS $$
    WITH gone AS (
        DELETE FROM handshake_nonces WHERE ctid = ANY (ARRAY(
            SELECT ctid FROM handshake_nonces WHERE expires_at <= p_now
            ORDER BY expires_at LIMIT p_limit FOR UPDATE SKIP LOCKED
        ))
        RETURNING 1
    )
    SELECT count(*) FROM gone
$$;

CREATE FUNCTION delete_expired_tokens(p_now timestamptz, p_limit integer) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path FROM CURRENT AS $$
    WITH gone AS (
        DELETE FROM enrollment_tokens WHERE ctid = ANY (ARRAY(
            SELECT ctid FROM enrollment_tokens WHERE expires_at <= p_now
            ORDER BY expires_at LIMIT p_limit FOR UPDATE SKIP LOCKED
        ))
        RETURNING 1
    )
    SELECT count(*) FROM gone
$$;

REVOKE ALL ON FUNCTION delete_expired_sessions(timestamptz, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION delete_expired_nonces(timestamptz, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION delete_expired_tokens(timestamptz, integer) FROM PUBLIC;

-- Least privilege for the application role. No DELETE anywhere (cleanup goes through the
-- functions above); only INSERT and SELECT on the append-only tables.
DO $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO qflare_app', current_schema());
END
$$;
GRANT SELECT, INSERT ON tenants TO qflare_app;
GRANT SELECT, INSERT, UPDATE ON devices, device_keys, enrollment_tokens, server_keys, sessions,
    admin_tokens TO qflare_app;
GRANT SELECT, INSERT ON handshake_nonces, audit_entries, security_events TO qflare_app;
GRANT SELECT ON schema_migrations TO qflare_app;
GRANT EXECUTE ON FUNCTION delete_expired_sessions(timestamptz, integer),
    delete_expired_nonces(timestamptz, integer),
    delete_expired_tokens(timestamptz, integer) TO qflare_app;
