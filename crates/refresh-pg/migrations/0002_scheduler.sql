-- The scheduler (SPEC §6): auto-sync bookkeeping, data removal of inactive consents,
-- and indexes for the periodic sweeps (expiry, stalled refreshes, retention).

-- The consent's deterministic auto-sync jitter, in ten-thousandths of the interval
-- (refresh_core::autosync_jitter_bp), written at registration.
ALTER TABLE consents ADD COLUMN autosync_jitter_bp integer NOT NULL DEFAULT 0
    CHECK (autosync_jitter_bp BETWEEN 0 AND 999);
-- Auto-sync requests since the last successful refresh (the backoff's exponent), and
-- when the scheduler last asked. `next_autosync_at` (0001) is the earliest time it
-- asks again.
ALTER TABLE consents ADD COLUMN autosync_attempts integer NOT NULL DEFAULT 0;
ALTER TABLE consents ADD COLUMN last_autosync_at timestamptz;
-- When the stored data of an inactive consent was all removed (null: still to do).
ALTER TABLE consents ADD COLUMN data_removed_at timestamptz;

DROP INDEX consents_autosync_due;
CREATE INDEX consents_active_by_tenant ON consents (tenant_id) WHERE status = 'ACTIVE';
CREATE INDEX consents_by_expiry ON consents (expires_at) WHERE status = 'ACTIVE';
CREATE INDEX consents_data_to_remove ON consents (updated_at)
    WHERE status = 'INACTIVE' AND data_removed_at IS NULL;
CREATE INDEX refreshes_in_flight_by_start ON refreshes (not_before) WHERE status = 'INITIALIZED';
CREATE INDEX outbox_published_by_age ON outbox (published_at) WHERE published_at IS NOT NULL;
