//! PostgreSQL adapter: connection pool, per-namespace schema and migrations, the
//! store of consents, refreshes, idempotency keys, tenant settings and the outbox, and
//! the encryption of bank tokens at rest.
//!
//! Every namespace lives in its own PostgreSQL schema; connections set `search_path`
//! to it, so the migrations and queries never name a schema.

mod crypto;
mod gate_state;
mod lifecycle;
mod list;
mod pool;
mod read;
mod rekey;
mod store;
mod stored;

pub use crypto::{CryptoError, KeyId, SealedWith, TokenCipher};
pub use gate_state::GateRow;
pub use lifecycle::{AutosyncClaim, RemovedData, Retained, StalledCandidate};
pub use list::{ConsentCursor, ConsentFilter, ReplayedEvent};
pub use pool::{
    DatabaseSettings, PgError, Schema, check_migrated, connect, drop_schema, health, migrate,
};
pub use read::{ChangePage, ItemKind, TxFilter, TxKey, TxPage, TxRow};
pub use rekey::{RekeyBatch, TokenKeys};
pub use store::{
    Admission, ClaimedEvents, ConsentRow, KeyAnswer, KeyFence, KeyReservation, NewConsent,
    OutboxEvent, PendingEvent, PendingJob, Registration, Store, StoreError, TenantSettingsRow,
    Written, write_admission, write_admissions,
};
pub use stored::{
    AccountData, AccountDetails, AttemptStart, BalanceData, DataState, FetchedData, Finish,
    ItemData, JobState,
};
