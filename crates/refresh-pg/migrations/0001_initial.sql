-- refreshd schema. Runs inside the namespace's own schema (search_path), so no
-- statement here names a schema.

-- Per-tenant settings (SPEC §6).
CREATE TABLE tenant_settings (
    tenant_id               text PRIMARY KEY,
    autosync_interval_hours integer CHECK (autosync_interval_hours BETWEEN 6 AND 720),
    inactivation_days       integer NOT NULL DEFAULT 90 CHECK (inactivation_days BETWEEN 1 AND 3650),
    updated_at              timestamptz NOT NULL DEFAULT now()
);

-- Consents. The bank access token is stored encrypted (AES-256-GCM, nonce || ciphertext)
-- and is never returned by the API.
CREATE TABLE consents (
    consent_id        uuid PRIMARY KEY,
    tenant_id         text NOT NULL,
    provider_id       text NOT NULL,
    bank_consent_id   text NOT NULL,
    access_token_enc  bytea NOT NULL,
    expires_at        timestamptz NOT NULL,
    status            text NOT NULL DEFAULT 'ACTIVE'
                      CHECK (status IN ('ACTIVE', 'REVOKED', 'EXPIRED', 'INACTIVE')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    -- Last refresh that reached UPDATED: the fence a later write is checked against,
    -- and the clock of inactivation.
    last_refreshed_at timestamptz,
    last_refresh_id   uuid,
    -- When the scheduler next requests an AUTOSYNC refresh (null: not scheduled).
    next_autosync_at  timestamptz
);
CREATE INDEX consents_by_tenant ON consents (tenant_id, created_at DESC);
CREATE INDEX consents_autosync_due ON consents (next_autosync_at) WHERE status = 'ACTIVE';

-- Refreshes: the record of every admitted refresh, and the history (SPEC §3, §6).
CREATE TABLE refreshes (
    refresh_id      uuid PRIMARY KEY,
    consent_id      uuid NOT NULL REFERENCES consents ON DELETE CASCADE,
    tenant_id       text NOT NULL,
    requested_by    text NOT NULL
                    CHECK (requested_by IN ('APP', 'API', 'PORTAL', 'ADMIN', 'AUTOSYNC')),
    status          text NOT NULL CHECK (status IN ('INITIALIZED', 'UPDATED', 'ERROR')),
    -- The initial connection load (all data kinds) rather than a plain refresh.
    initial         boolean NOT NULL DEFAULT false,
    date_requested  timestamptz NOT NULL,
    not_before      timestamptz NOT NULL,
    started_at      timestamptz,
    finished_at     timestamptz,
    attempts        integer NOT NULL DEFAULT 0,
    error_code      text,
    error_message   text,
    summary         jsonb,
    CHECK ((status = 'ERROR') = (error_code IS NOT NULL))
);
CREATE INDEX refreshes_history ON refreshes (consent_id, date_requested DESC);
CREATE INDEX refreshes_by_date ON refreshes (date_requested);
-- Backstop of the Redis in-flight lock: at most one INITIALIZED refresh per consent.
CREATE UNIQUE INDEX refreshes_one_in_flight ON refreshes (consent_id) WHERE status = 'INITIALIZED';

-- Idempotency keys (HTTP Idempotency-Key, AMQP message_id): the first answer, kept 24 h.
CREATE TABLE idempotency_keys (
    tenant_id     text NOT NULL,
    key           text NOT NULL,
    created_at    timestamptz NOT NULL,
    http_status   integer NOT NULL,
    response      jsonb NOT NULL,
    PRIMARY KEY (tenant_id, key)
);
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);

-- Stored data: accounts. `data` is the bank's account object without its party data
-- (account holder names and identifications), which live in account_parties.
CREATE TABLE accounts (
    consent_id  uuid NOT NULL REFERENCES consents ON DELETE CASCADE,
    account_id  text NOT NULL,
    data        jsonb NOT NULL,
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (consent_id, account_id)
);

-- Party data of accounts, written by the initial connection only; a refresh never
-- touches this table.
CREATE TABLE account_parties (
    consent_id  uuid NOT NULL REFERENCES consents ON DELETE CASCADE,
    account_id  text NOT NULL,
    data        jsonb NOT NULL,
    loaded_at   timestamptz NOT NULL,
    PRIMARY KEY (consent_id, account_id)
);

-- Balances: replaced as a set per account by every refresh.
CREATE TABLE balances (
    consent_id    uuid NOT NULL REFERENCES consents ON DELETE CASCADE,
    account_id    text NOT NULL,
    position      integer NOT NULL,
    balance_type  text NOT NULL,
    credit_debit  text NOT NULL CHECK (credit_debit IN ('CREDIT', 'DEBIT')),
    amount        text NOT NULL CHECK (amount ~ '^-?[0-9]{1,13}(\.[0-9]{1,5})?$'),
    currency      text NOT NULL,
    date_time     timestamptz NOT NULL,
    data          jsonb NOT NULL,
    PRIMARY KEY (consent_id, account_id, position)
);

-- Transactions: merged by (account, TransactionId); id-less ones by (account, booking date).
-- Amounts are decimal strings exactly as the bank gave them.
CREATE TABLE transactions (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consent_id         uuid NOT NULL REFERENCES consents ON DELETE CASCADE,
    account_id         text NOT NULL,
    transaction_id     text,
    booking_date       date NOT NULL,
    booking_date_time  timestamptz NOT NULL,
    status             text NOT NULL CHECK (status IN ('BOOKED', 'PENDING')),
    amount             text NOT NULL CHECK (amount ~ '^-?[0-9]{1,13}(\.[0-9]{1,5})?$'),
    currency           text NOT NULL,
    credit_debit       text NOT NULL CHECK (credit_debit IN ('CREDIT', 'DEBIT')),
    description        text,
    data               jsonb NOT NULL,
    refresh_id         uuid NOT NULL
);
-- The merge: match by id, and find a date's id-less rows.
CREATE UNIQUE INDEX transactions_by_bank_id
    ON transactions (consent_id, account_id, transaction_id) WHERE transaction_id IS NOT NULL;
CREATE INDEX transactions_idless_by_date
    ON transactions (consent_id, account_id, booking_date) WHERE transaction_id IS NULL;
-- Keyset paging, newest first, over a consent or one of its accounts.
CREATE INDEX transactions_page ON transactions (consent_id, booking_date_time DESC, id DESC);
CREATE INDEX transactions_page_by_account
    ON transactions (consent_id, account_id, booking_date_time DESC, id DESC);

-- The other data kinds, as stored at the initial connection; never refreshed.
CREATE TABLE stored_items (
    consent_id  uuid NOT NULL REFERENCES consents ON DELETE CASCADE,
    kind        text NOT NULL CHECK (kind IN ('parties', 'beneficiaries', 'direct_debits',
                    'standing_orders', 'scheduled_payments', 'statements', 'products', 'offers')),
    position    integer NOT NULL,
    account_id  text,
    data        jsonb NOT NULL,
    loaded_at   timestamptz NOT NULL,
    PRIMARY KEY (consent_id, kind, position)
);

-- Transactional outbox: an event is written in the same transaction as the status it
-- reports, then published with confirms and marked.
CREATE TABLE outbox (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id      uuid NOT NULL UNIQUE,
    routing_key   text NOT NULL,
    payload       jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
