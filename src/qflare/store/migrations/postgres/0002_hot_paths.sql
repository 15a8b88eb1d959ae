-- QFLARE schema 2, PostgreSQL: the hot paths. docs/STORAGE.md ("Round trips", "Fillfactor").
-- Runs as the schema owner, with search_path set to the QFLARE schema and pg_temp.
--
-- 1. One-round-trip reads. Each function sets the tenant with set_config(..., true) and then
--    runs the same query as its statement in qflare.store.sql (named beside it). The store
--    calls them as a single statement outside any explicit transaction, so the statement's
--    implicit transaction is the one the tenant setting belongs to: it ends with the call.
--    * SECURITY INVOKER: the query runs as the caller (qflare_app), so the tenant_isolation
--      policies apply to it exactly as to the store's other statements. No new right is
--      granted: qflare_app may already name any tenant with set_config.
--    * STABLE: PostgreSQL refuses INSERT/UPDATE/DELETE inside a non-volatile function, which
--      keeps these reads as read-only as the READ ONLY transactions they replace.
--    * plpgsql, not sql: PostgreSQL 15 replans a SQL function's body on every call, while
--      plpgsql keeps the prepared plan for the session (a PK lookup either way).
--    * No search_path is pinned: like the store's own statements, the body resolves names in
--      the caller's search_path (the QFLARE schema), and it runs with no more rights than the
--      caller has anyway.
-- 2. Fillfactor on the two tables the handshake and the session path update in place.

-- GET_DEVICE
CREATE FUNCTION read_device(p_tenant text, p_device text) RETURNS SETOF devices
LANGUAGE plpgsql STABLE SECURITY INVOKER AS $$
BEGIN
    PERFORM set_config('app.tenant_id', p_tenant, true);
    RETURN QUERY SELECT * FROM devices WHERE tenant_id = p_tenant AND device_id = p_device;
END
$$;

-- GET_ACTIVE_DEVICE_KEY
CREATE FUNCTION read_active_device_key(p_tenant text, p_device text) RETURNS SETOF device_keys
LANGUAGE plpgsql STABLE SECURITY INVOKER AS $$
BEGIN
    PERFORM set_config('app.tenant_id', p_tenant, true);
    RETURN QUERY SELECT * FROM device_keys
        WHERE tenant_id = p_tenant AND device_id = p_device AND state = 'active';
END
$$;

-- GET_DEVICE_KEY
CREATE FUNCTION read_device_key(p_tenant text, p_device text, p_version bigint)
RETURNS SETOF device_keys
LANGUAGE plpgsql STABLE SECURITY INVOKER AS $$
BEGIN
    PERFORM set_config('app.tenant_id', p_tenant, true);
    RETURN QUERY SELECT * FROM device_keys
        WHERE tenant_id = p_tenant AND device_id = p_device AND version = p_version;
END
$$;

-- GET_ACTIVE_SERVER_KEY
CREATE FUNCTION read_active_server_key(p_tenant text, p_purpose text) RETURNS SETOF server_keys
LANGUAGE plpgsql STABLE SECURITY INVOKER AS $$
BEGIN
    PERFORM set_config('app.tenant_id', p_tenant, true);
    RETURN QUERY SELECT * FROM server_keys
        WHERE tenant_id = p_tenant AND purpose = p_purpose AND state = 'active';
END
$$;

-- LIST_SERVER_KEYS with its optional purpose and state filters (NULL: any), in the order and
-- with the limit list_server_keys asks for.
CREATE FUNCTION read_server_keys(p_tenant text, p_purpose text, p_state text, p_limit bigint)
RETURNS SETOF server_keys
LANGUAGE plpgsql STABLE SECURITY INVOKER AS $$
BEGIN
    PERFORM set_config('app.tenant_id', p_tenant, true);
    RETURN QUERY SELECT * FROM server_keys
        WHERE tenant_id = p_tenant
          AND (p_purpose IS NULL OR purpose = p_purpose)
          AND (p_state IS NULL OR state = p_state)
        ORDER BY purpose, version LIMIT p_limit;
END
$$;

-- GET_SESSION
CREATE FUNCTION read_session(p_tenant text, p_session_id bytea) RETURNS SETOF sessions
LANGUAGE plpgsql STABLE SECURITY INVOKER AS $$
BEGIN
    PERFORM set_config('app.tenant_id', p_tenant, true);
    RETURN QUERY SELECT * FROM sessions
        WHERE tenant_id = p_tenant AND session_id = p_session_id;
END
$$;

-- Least privilege, as in 0001: no PUBLIC default, EXECUTE for the application role only.
REVOKE ALL ON FUNCTION read_device(text, text), read_active_device_key(text, text),
    read_device_key(text, text, bigint), read_active_server_key(text, text),
    read_server_keys(text, text, text, bigint), read_session(text, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION read_device(text, text), read_active_device_key(text, text),
    read_device_key(text, text, bigint), read_active_server_key(text, text),
    read_server_keys(text, text, text, bigint), read_session(text, bytea) TO qflare_app;

-- Room on each page for the new version of a row updated in place, so that an update that
-- changes no indexed column stays a HOT update (no new index entries, pruned without VACUUM).
-- sessions: update_session rewrites the sealed chain state, replay window and counters of a
-- ~0.5 kB row on every session step. devices: every handshake updates last_seen and
-- last_handshake_ts (touch_device, advance_handshake_floor) of a ~0.1 kB row. Applies to pages
-- written from now on; existing pages gain the room as they are pruned (VACUUM FULL or
-- pg_repack would rewrite them all at once, under their own locks: not done here).
ALTER TABLE sessions SET (fillfactor = 85);
ALTER TABLE devices SET (fillfactor = 90);
