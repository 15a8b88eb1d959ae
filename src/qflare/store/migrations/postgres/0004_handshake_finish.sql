-- QFLARE schema 4, PostgreSQL: a handshake as one store read and one store write, one round
-- trip each. docs/STORAGE.md ("Round trips"). Runs as the schema owner, search_path = the
-- schema, pg_temp.
--
-- Both functions follow 0002 and 0003: set_config('app.tenant_id', ..., true) first, then the
-- shared statements of qflare.store.sql (named beside them), SECURITY INVOKER (row-level
-- security applies to the caller, qflare_app, as everywhere else; nothing new is granted),
-- plpgsql (the plans are kept per connection), no pinned search_path. The store calls each as
-- a single statement outside any explicit transaction, so the statement's implicit transaction
-- holds the tenant setting and, for finish_handshake, makes its writes all or nothing.

-- GET_HELLO: what read_device_with_key returns, and whether the ClientHello's nonce and
-- timestamp would pass accept_handshake's check now (fresh: the device has not used the nonce
-- and the timestamp is not below its floor). STABLE, so PostgreSQL refuses any write inside it.
CREATE FUNCTION read_hello(p_tenant text, p_device text, p_nonce bytea, p_ts bigint)
RETURNS TABLE (
    tenant_id ident, device_id ident, state text, state_reason text, created_at timestamptz,
    last_seen timestamptz, failure_count bigint, last_handshake_ts bigint,
    key_version bigint, key_algorithm text, key_public_key bytea, key_state text,
    key_created_at timestamptz, fresh boolean
)
LANGUAGE plpgsql STABLE SECURITY INVOKER AS $$
#variable_conflict use_column
BEGIN
    PERFORM set_config('app.tenant_id', p_tenant, true);
    RETURN QUERY SELECT d.tenant_id, d.device_id, d.state, d.state_reason, d.created_at,
            d.last_seen, d.failure_count, d.last_handshake_ts, k.version, k.algorithm,
            k.public_key, k.state, k.created_at,
            NOT EXISTS (SELECT 1 FROM handshake_nonces n WHERE n.tenant_id = d.tenant_id
                AND n.device_id = d.device_id AND n.nonce = p_nonce)
            AND (d.last_handshake_ts IS NULL OR d.last_handshake_ts <= p_ts)
        FROM devices d JOIN device_keys k ON k.tenant_id = d.tenant_id
            AND k.device_id = d.device_id AND k.state = 'active'
        WHERE d.tenant_id = p_tenant AND d.device_id = p_device;
END
$$;

-- finish_handshake: everything a ClientFinish writes (Store.finish_handshake), in order:
--   GET_DEVICE with the row locked (FOR NO KEY UPDATE, as accept_handshake: a concurrent
--     UPDATE of the state, a quarantine, comes wholly before or after this call); an unknown
--     device raises foreign_key_violation, which the store maps to NotFound;
--   a state other than enrolled or active: 'not_allowed';
--   GET_SESSION: the session exists: 'exists' with the stored row;
--   with p_nonce: accept_handshake's check (the floor, RECORD_NONCE) and 'replay' if it fails,
--     else RAISE_FLOOR;
--   INSERT_SESSION (its fourteen parameters are the first fourteen here, in its order; without
--     ON CONFLICT: a session inserted meanwhile by a call not holding this device's lock
--     raises unique_violation and rolls everything back), then TOUCH_AND_ACTIVATE: 'created'.
-- Every outcome but 'created' returns before the first write (or after a nonce insert that
-- wrote nothing). One row: the outcome, the device as read (after the touch for 'created'),
-- and the session (the inserted or the stored row; NULL for 'not_allowed' and 'replay').
CREATE FUNCTION finish_handshake(
    p_tenant text, p_session_id bytea, p_device text, p_state text, p_suite integer,
    p_epoch bigint, p_chain bytea, p_window bytea, p_now timestamptz, p_expires timestamptz,
    p_messages_sent bigint, p_messages_received bigint, p_bytes_sent bigint,
    p_bytes_received bigint, p_nonce bytea, p_ts bigint, p_nonce_expires timestamptz,
    OUT outcome text, OUT device devices, OUT session sessions
)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER AS $$
BEGIN
    PERFORM set_config('app.tenant_id', p_tenant, true);
    SELECT * INTO device FROM devices
        WHERE tenant_id = p_tenant AND device_id = p_device FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'device not found' USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF device.state NOT IN ('enrolled', 'active') THEN
        outcome := 'not_allowed';
        RETURN;
    END IF;
    SELECT * INTO session FROM sessions
        WHERE tenant_id = p_tenant AND session_id = p_session_id;
    IF FOUND THEN
        outcome := 'exists';
        RETURN;
    END IF;
    session := NULL;  -- not a row of NULLs
    IF p_nonce IS NOT NULL THEN
        IF device.last_handshake_ts IS NOT NULL AND p_ts < device.last_handshake_ts THEN
            outcome := 'replay';
            RETURN;
        END IF;
        INSERT INTO handshake_nonces (tenant_id, device_id, nonce, device_ts, expires_at)
            VALUES (p_tenant, p_device, p_nonce, p_ts, p_nonce_expires)
            ON CONFLICT (tenant_id, device_id, nonce) DO NOTHING;
        IF NOT FOUND THEN
            outcome := 'replay';
            RETURN;
        END IF;
        UPDATE devices SET last_handshake_ts = p_ts
            WHERE tenant_id = p_tenant AND device_id = p_device;
    END IF;
    INSERT INTO sessions (tenant_id, session_id, device_id, state, suite, epoch,
            encrypted_chain_state, replay_window, created_at, expires_at, updated_at,
            messages_sent, messages_received, bytes_sent, bytes_received)
        VALUES (p_tenant, p_session_id, p_device, p_state, p_suite, p_epoch, p_chain, p_window,
            p_now, p_expires, p_now, p_messages_sent, p_messages_received, p_bytes_sent,
            p_bytes_received)
        RETURNING * INTO session;
    UPDATE devices SET last_seen = CASE WHEN last_seen IS NULL OR last_seen < p_now THEN p_now
            ELSE last_seen END,
        state = CASE WHEN state = 'enrolled' THEN 'active' ELSE state END,
        state_reason = CASE WHEN state = 'enrolled' THEN NULL ELSE state_reason END
        WHERE tenant_id = p_tenant AND device_id = p_device
        RETURNING * INTO device;
    outcome := 'created';
END
$$;

-- Least privilege, as in 0001 to 0003: no PUBLIC default, EXECUTE for the application role.
REVOKE ALL ON FUNCTION read_hello(text, text, bytea, bigint),
    finish_handshake(text, bytea, text, text, integer, bigint, bytea, bytea, timestamptz,
        timestamptz, bigint, bigint, bigint, bigint, bytea, bigint, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION read_hello(text, text, bytea, bigint),
    finish_handshake(text, bytea, text, text, integer, bigint, bytea, bytea, timestamptz,
        timestamptz, bigint, bigint, bigint, bigint, bytea, bigint, timestamptz) TO qflare_app;
