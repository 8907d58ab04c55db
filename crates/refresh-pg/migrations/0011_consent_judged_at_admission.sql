-- The admission statement judges the consent itself (SPEC §2 rules 1–2): a record is
-- written only for a consent that is ACTIVE, of the record's tenant and unexpired at
-- the admission's time. The admit script checks the consent's facts as mirrored in
-- Redis, which may be stale (a change not yet written through, or written through
-- before an older lookup stored its facts); PostgreSQL stays the record, and an
-- admission it refuses here (`consent`; nothing written) is undone and answered from
-- a fresh lookup.
CREATE OR REPLACE FUNCTION admit_refreshes(
    p_refresh_ids uuid[], p_consent_ids uuid[], p_tenant_ids text[], p_requested_by text[],
    p_initial boolean[], p_date_requested timestamptz[], p_not_before timestamptz[],
    p_traceparents text[], p_epochs bigint[],
    p_event_ids uuid[], p_routing_keys text[], p_payloads jsonb[], p_jobs bytea[],
    p_key_tenants text[], p_keys text[], p_key_fences timestamptz[], p_key_statuses integer[],
    p_key_answers jsonb[]
) RETURNS TABLE (admitted uuid, outcome text)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_stamp bigint;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtextextended('refreshd gate ' || current_schema(), 0));
    SELECT g.stamp INTO v_stamp FROM gate_epoch g;
    RETURN QUERY
    WITH batch AS (
        SELECT * FROM unnest(p_refresh_ids, p_consent_ids, p_tenant_ids, p_requested_by,
                             p_initial, p_date_requested, p_not_before, p_traceparents,
                             p_epochs, p_event_ids, p_routing_keys, p_payloads, p_jobs,
                             p_key_tenants, p_keys, p_key_fences, p_key_statuses, p_key_answers)
            AS b (refresh_id, consent_id, tenant_id, requested_by, initial, date_requested,
                  not_before, traceparent, epoch, event_id, routing_key, payload, job,
                  key_tenant, key, key_fence, key_status, key_answer)
    ),
    written AS (
        INSERT INTO refreshes AS r (refresh_id, consent_id, tenant_id, requested_by, status,
                                    initial, date_requested, not_before, traceparent)
        SELECT b.refresh_id, b.consent_id, b.tenant_id, b.requested_by, 'INITIALIZED',
               b.initial, b.date_requested, b.not_before, b.traceparent
        FROM batch b
        JOIN consents c ON c.consent_id = b.consent_id AND c.tenant_id = b.tenant_id
                       AND c.status = 'ACTIVE' AND c.expires_at > b.date_requested
        WHERE v_stamp IS NULL OR b.epoch >= v_stamp
        ON CONFLICT (consent_id) WHERE status = 'INITIALIZED' DO NOTHING
        RETURNING r.refresh_id
    ),
    events AS (
        INSERT INTO outbox (event_id, routing_key, payload, created_at)
        SELECT b.event_id, b.routing_key, b.payload, b.date_requested
        FROM batch b JOIN written w ON w.refresh_id = b.refresh_id
        ON CONFLICT (event_id) DO NOTHING
    ),
    jobs AS (
        INSERT INTO job_outbox (refresh_id, body, not_before, created_at)
        SELECT b.refresh_id, b.job, b.not_before, b.date_requested
        FROM batch b JOIN written w ON w.refresh_id = b.refresh_id
    ),
    answered AS (
        UPDATE idempotency_keys k SET http_status = b.key_status, response = b.key_answer
        FROM batch b JOIN written w ON w.refresh_id = b.refresh_id
        WHERE b.key IS NOT NULL AND k.tenant_id = b.key_tenant AND k.key = b.key
          AND k.created_at = b.key_fence AND k.http_status = 0
    )
    SELECT b.refresh_id,
           CASE WHEN w.refresh_id IS NOT NULL THEN 'written'
                WHEN v_stamp IS NOT NULL AND b.epoch < v_stamp THEN 'stale'
                WHEN NOT EXISTS (
                    SELECT 1 FROM consents c
                    WHERE c.consent_id = b.consent_id AND c.tenant_id = b.tenant_id
                      AND c.status = 'ACTIVE' AND c.expires_at > b.date_requested
                ) THEN 'consent'
                ELSE 'in_flight' END
    FROM batch b LEFT JOIN written w ON w.refresh_id = b.refresh_id;
END
$$;
