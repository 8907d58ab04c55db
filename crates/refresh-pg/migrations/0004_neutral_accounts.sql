-- Accounts in a bank-neutral shape (SPEC §3): the fields every connector maps, beside
-- `data`, the bank's own object (without its party data), which is kept as it came.

ALTER TABLE accounts
    ADD COLUMN status           text,
    ADD COLUMN currency         text,
    ADD COLUMN account_type     text,
    ADD COLUMN account_sub_type text,
    ADD COLUMN nickname         text,
    ADD COLUMN description      text,
    ADD COLUMN opening_date     timestamptz;

-- Accounts stored before: every connector then was OBIE, whose fields these are. The
-- opening date is left to the next refresh (the bank's text is not guessed at here).
UPDATE accounts SET
    status = data->>'Status',
    currency = data->>'Currency',
    account_type = data->>'AccountType',
    account_sub_type = data->>'AccountSubType',
    nickname = data->>'Nickname',
    description = data->>'Description';
