-- Until when the running bank attempt of a refresh is leased to one delivery of its
-- job. A second delivery of the same job (the broker redelivers when a channel
-- closes under a worker that keeps running) finds the lease live and is deferred,
-- so the bank is never called twice at once for one refresh. NULL: no attempt runs.
ALTER TABLE refreshes ADD COLUMN attempt_until timestamptz;
