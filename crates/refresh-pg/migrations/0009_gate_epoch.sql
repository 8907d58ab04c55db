-- The stamp of the latest gate rebuild begun (Redis time in ms, as in the epoch keys).
-- An admission's record is written only if no rebuild began after the state that
-- admitted it (its stamp is at least this one), under a shared advisory lock that a
-- rebuild takes exclusively to advance the stamp: so every admission decided on a lost
-- state has either committed before the rebuild reads the records, or is refused.
CREATE TABLE gate_epoch (
    id    boolean PRIMARY KEY DEFAULT true CHECK (id),
    stamp bigint NOT NULL
);
