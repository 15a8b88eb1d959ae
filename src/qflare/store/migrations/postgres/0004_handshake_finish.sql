-- QFLARE schema 4, PostgreSQL: a ClientFinish's writes as one store call, one round trip.
-- docs/STORAGE.md ("The handshake"). Runs as the schema owner, search_path = the schema,
-- pg_temp.
--
-- The function follows 0002 and 0003: set_config('app.tenant_id', ..., true) first, then the
-- shared statements of qflare.store.sql (named beside them), SECURITY INVOKER (row-level
-- security applies to the caller, qflare_app, as everywhere else; nothing new is granted),
-- plpgsql (the plans are kept per connection), no pinned search_path. The store calls it as a
-- single statement outside any explicit transaction, so the statement's implicit transaction
-- holds the tenant setting and makes its writes all or nothing.

-- finish_handshake: everything a ClientFinish writes (Store.finish_handshake), in order:
--   GET_DEVICE with the row locked (FOR NO KEY UPDATE, as accept_handshake: a concurrent
--     UPDATE of the state, a quarantine, comes wholly before or after this call); an unknown
--     device raises foreign_key_violation, which the store maps to NotFound;
--   a state other than enrolled or active: 'not_allowed';
--   GET_SESSION: the session exists: 'exists' with the stored row;
--   INSERT_SESSION (its fourteen parameters are this function's, in its order; without
--     ON CONFLICT: a session inserted meanwhile by a call not holding this device's lock
--     raises unique_violation and rolls everything back), then TOUCH_AND_ACTIVATE: 'created'.
-- Every outcome but 'created' returns before the first write. One row: the outcome, the device
-- as read (after the touch for 'created'), the session (the inserted or the stored row; NULL
-- for 'not_allowed'), and the device's last_seen as read before any touch.
CREATE FUNCTION finish_handshake(
    p_tenant text, p_session_id bytea, p_device text, p_state text, p_suite integer,
    p_epoch bigint, p_chain bytea, p_window bytea, p_now timestamptz, p_expires timestamptz,
    p_messages_sent bigint, p_messages_received bigint, p_bytes_sent bigint,
    p_bytes_received bigint,
    OUT outcome text, OUT device devices, OUT session sessions,
    OUT previous_last_seen timestamptz
)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER AS $$
BEGIN
    PERFORM set_config('app.tenant_id', p_tenant, true);
    SELECT * INTO device FROM devices
        WHERE tenant_id = p_tenant AND device_id = p_device FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'device not found' USING ERRCODE = 'foreign_key_violation';
    END IF;
    previous_last_seen := device.last_seen;
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
REVOKE ALL ON FUNCTION finish_handshake(text, bytea, text, text, integer, bigint, bytea, bytea,
    timestamptz, timestamptz, bigint, bigint, bigint, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION finish_handshake(text, bytea, text, text, integer, bigint, bytea,
    bytea, timestamptz, timestamptz, bigint, bigint, bigint, bigint) TO qflare_app;
