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

-- One admission, one statement: under the gate's advisory lock (shared; a rebuild
-- takes it exclusively), and only if no rebuild began after the gate state that
-- admitted it (stamp `p_epoch`), the INITIALIZED record, its event and its job.
-- Each statement of the function takes a fresh snapshot, so the epoch is read after
-- the lock is held. False: a rebuild began since (nothing written). A unique
-- violation: another refresh of the consent is still INITIALIZED.
CREATE FUNCTION admit_refresh(
    p_refresh_id uuid, p_consent_id uuid, p_tenant_id text, p_requested_by text,
    p_initial boolean, p_date_requested timestamptz, p_not_before timestamptz,
    p_traceparent text, p_epoch bigint,
    p_event_id uuid, p_routing_key text, p_payload jsonb, p_job bytea
) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtextextended('refreshd gate ' || current_schema(), 0));
    IF EXISTS (SELECT 1 FROM gate_epoch WHERE stamp > p_epoch) THEN
        RETURN false;
    END IF;
    INSERT INTO refreshes (refresh_id, consent_id, tenant_id, requested_by, status,
                           initial, date_requested, not_before, traceparent)
    VALUES (p_refresh_id, p_consent_id, p_tenant_id, p_requested_by, 'INITIALIZED',
            p_initial, p_date_requested, p_not_before, p_traceparent);
    INSERT INTO outbox (event_id, routing_key, payload, created_at)
    VALUES (p_event_id, p_routing_key, p_payload, p_date_requested)
    ON CONFLICT (event_id) DO NOTHING;
    INSERT INTO job_outbox (refresh_id, body, not_before, created_at)
    VALUES (p_refresh_id, p_job, p_not_before, p_date_requested);
    RETURN true;
END
$$;
