-- Change sets (SPEC §3, GET /v1/refreshes/{refreshId}/changes): what each UPDATED
-- refresh added, updated and removed, and the balances it set, in the API's shape.
-- Written in the refresh's finishing transaction; removed with its history row.
CREATE TABLE refresh_changes (
    refresh_id  uuid NOT NULL REFERENCES refreshes ON DELETE CASCADE,
    seq         integer NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('added', 'updated', 'removed', 'balance')),
    item        jsonb NOT NULL,
    PRIMARY KEY (refresh_id, seq)
);
