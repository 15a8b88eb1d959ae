-- QFLARE schema 3, PostgreSQL: the ClientHello's store calls as one round trip each.
-- docs/STORAGE.md ("Round trips"). Runs as the schema owner, search_path = the schema, pg_temp.
--
-- Both functions follow 0002: set_config('app.tenant_id', ..., true) first, then the shared
-- statements of qflare.store.sql (named beside them), SECURITY INVOKER (row-level security
-- applies to the caller, qflare_app, as everywhere else; nothing new is granted), plpgsql
-- (the plans are kept per connection), no pinned search_path. The store calls each as a
-- single statement outside any explicit transaction, so the statement's implicit transaction
-- holds the tenant setting and, for accept_handshake, makes its writes all or nothing.

-- GET_DEVICE_WITH_KEY: the device and its active key (inner join: nothing if either is
-- missing). STABLE, so PostgreSQL refuses any write inside it. The device's state is read
-- fresh on every call, as by read_device.
CREATE FUNCTION read_device_with_key(p_tenant text, p_device text)
RETURNS TABLE (
    tenant_id ident, device_id ident, state text, state_reason text, created_at timestamptz,
    last_seen timestamptz, failure_count bigint, last_handshake_ts bigint,
    key_version bigint, key_algorithm text, key_public_key bytea, key_state text,
    key_created_at timestamptz
)
LANGUAGE plpgsql STABLE SECURITY INVOKER AS $$
#variable_conflict use_column
BEGIN
    PERFORM set_config('app.tenant_id', p_tenant, true);
    RETURN QUERY SELECT d.tenant_id, d.device_id, d.state, d.state_reason, d.created_at,
            d.last_seen, d.failure_count, d.last_handshake_ts, k.version, k.algorithm,
            k.public_key, k.state, k.created_at
        FROM devices d JOIN device_keys k ON k.tenant_id = d.tenant_id
            AND k.device_id = d.device_id AND k.state = 'active'
        WHERE d.tenant_id = p_tenant AND d.device_id = p_device;
END
$$;

-- accept_handshake: GET_HANDSHAKE_FLOOR (with the device row locked, so one device's
-- handshakes run one after another), RECORD_NONCE, RAISE_FLOOR. True only if the nonce is
-- new and the timestamp is not below the floor; False writes nothing (the function returns
-- before its first write, or the nonce insert wrote nothing). An unknown device raises
-- foreign_key_violation, which the store maps to NotFound as it does for record_nonce.
CREATE FUNCTION accept_handshake(
    p_tenant text, p_device text, p_nonce bytea, p_ts bigint, p_expires timestamptz
) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY INVOKER AS $$
DECLARE
    v_floor bigint;
BEGIN
    PERFORM set_config('app.tenant_id', p_tenant, true);
    SELECT last_handshake_ts INTO v_floor FROM devices
        WHERE tenant_id = p_tenant AND device_id = p_device FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'device not found' USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF v_floor IS NOT NULL AND p_ts < v_floor THEN
        RETURN false;
    END IF;
    INSERT INTO handshake_nonces (tenant_id, device_id, nonce, device_ts, expires_at)
        VALUES (p_tenant, p_device, p_nonce, p_ts, p_expires)
        ON CONFLICT (tenant_id, device_id, nonce) DO NOTHING;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE devices SET last_handshake_ts = p_ts
        WHERE tenant_id = p_tenant AND device_id = p_device;
    RETURN true;
END
$$;

-- Least privilege, as in 0001 and 0002: no PUBLIC default, EXECUTE for the application role.
REVOKE ALL ON FUNCTION read_device_with_key(text, text),
    accept_handshake(text, text, bytea, bigint, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION read_device_with_key(text, text),
    accept_handshake(text, text, bytea, bigint, timestamptz) TO qflare_app;
