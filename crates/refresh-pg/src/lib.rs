//! PostgreSQL adapter: connection pool, per-namespace schema and migrations, the
//! store of consents, refreshes, idempotency keys, tenant settings and the outbox, and
//! the encryption of bank tokens at rest.
//!
//! Every namespace lives in its own PostgreSQL schema; connections set `search_path`
//! to it, so the migrations and queries never name a schema.

mod crypto;
mod gate_state;
mod lifecycle;
mod pool;
mod read;
mod store;
mod stored;

pub use crypto::{CryptoError, TokenCipher};
pub use gate_state::GateRow;
pub use lifecycle::{AutosyncClaim, RemovedData, Retained, StalledCandidate};
pub use pool::{
    DatabaseSettings, PgError, Schema, check_migrated, connect, drop_schema, health, migrate,
};
pub use read::{ItemKind, TxFilter, TxKey, TxPage, TxRow};
pub use store::{
    ClaimedEvents, ConsentRow, KeyReservation, NewConsent, OutboxEvent, PendingAdmission,
    PendingEvent, Store, StoreError, TenantSettingsRow,
};
pub use stored::{AccountData, AttemptStart, BalanceData, FetchedData, Finish, ItemData, JobState};
