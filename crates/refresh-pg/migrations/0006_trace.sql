-- Trace context (SPEC §5): the W3C traceparent a refresh carries from its request, so
-- that every event of the refresh (INITIALIZED, UPDATED, ERROR, whoever writes it)
-- carries it as the CloudEvents traceparent extension. NULL for refreshes admitted
-- before it was kept.
ALTER TABLE refreshes ADD COLUMN traceparent text;
