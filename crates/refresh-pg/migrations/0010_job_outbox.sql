-- The jobs of admitted refreshes, committed with their record and published to
-- RabbitMQ by the relay (SPEC §2: a job is durable once committed here). A row is
-- deleted once the broker confirmed its job; a relay that dies between the confirm
-- and the delete publishes it again, and the worker's fence on the refresh id makes
-- the second copy a no-op.
CREATE TABLE job_outbox (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    refresh_id  uuid NOT NULL UNIQUE,
    body        bytea NOT NULL,
    not_before  timestamptz NOT NULL,
    created_at  timestamptz NOT NULL
);

-- Admissions, one statement for a batch of them (concurrent admissions share one
-- commit): under the gate's advisory lock (shared; a rebuild takes it exclusively),
-- each admission whose gate state (stamp `epoch`) is not older than the latest
-- rebuild begun gets its INITIALIZED record, its event and its job. Each statement of
-- the function takes a fresh snapshot, so the stamp is read after the lock is held.
-- An admission that carries an idempotency key's answer records it in the same
-- commit (only while its reservation, fenced by its time, is still pending), so a
-- crash can never leave an admitted request's key unanswered.
-- One row per admission: `written`; `stale` (a rebuild began since; nothing written);
-- or `in_flight` (another refresh of the consent is still INITIALIZED; nothing
-- written).
CREATE FUNCTION admit_refreshes(
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
                ELSE 'in_flight' END
    FROM batch b LEFT JOIN written w ON w.refresh_id = b.refresh_id;
END
$$;
