-- When the latest bank attempt of a refresh began (`started_at` keeps the first).
-- The gate rebuild reads it to restore the workers' start log, so the bank never
-- sees more than the stagger's limit of starts in a period after Redis lost it.
ALTER TABLE refreshes ADD COLUMN last_started_at timestamptz;
