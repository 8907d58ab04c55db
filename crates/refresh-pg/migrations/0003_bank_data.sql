-- Bank data (SPEC §5): whether a consent's initial load has succeeded, and finding the
-- oldest transaction still stored as PENDING (the fetch window reaches back to it).

-- When an initial load of the consent last reached UPDATED; null: never, so the next
-- refresh is an initial load.
ALTER TABLE consents ADD COLUMN initial_loaded_at timestamptz;

-- Consents refreshed before this column existed: loaded when an initial refresh
-- reached UPDATED; also when the history no longer shows their initial refresh (it
-- was purged with its history row), since a consent refreshed successfully then was
-- loaded as far as anyone can tell. One whose initial load is known to have failed
-- stays null and is loaded again.
UPDATE consents c SET initial_loaded_at = COALESCE(
    (SELECT max(r.finished_at) FROM refreshes r
      WHERE r.consent_id = c.consent_id AND r.initial AND r.status = 'UPDATED'),
    CASE WHEN NOT EXISTS (SELECT 1 FROM refreshes r WHERE r.consent_id = c.consent_id AND r.initial)
         THEN c.last_refreshed_at END)
WHERE c.last_refreshed_at IS NOT NULL;

-- The window's start and the removal of pending rows the bank no longer returns.
CREATE INDEX transactions_pending
    ON transactions (consent_id, account_id, booking_date_time) WHERE status = 'PENDING';

-- One amount for the whole pipeline: what refresh_core::Amount accepts (up to 18
-- integer digits; NextGenPSD2 allows more than OBIE's 13). Connectors store amounts
-- without a sign (it is credit_debit); the optional '-' is the domain pattern's.
ALTER TABLE transactions DROP CONSTRAINT transactions_amount_check;
ALTER TABLE transactions ADD CONSTRAINT transactions_amount_check
    CHECK (amount ~ '^-?[0-9]{1,18}(\.[0-9]{1,5})?$');
ALTER TABLE balances DROP CONSTRAINT balances_amount_check;
ALTER TABLE balances ADD CONSTRAINT balances_amount_check
    CHECK (amount ~ '^-?[0-9]{1,18}(\.[0-9]{1,5})?$');
