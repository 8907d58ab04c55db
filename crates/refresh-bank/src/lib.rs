//! Bank connectors: the [`Connector`] trait the worker fetches through, the UK
//! Open Banking Read/Write API v3.1 Account Information client
//! ([`ObieConnector`]) and the Berlin Group NextGenPSD2 1.3 one
//! ([`BerlinGroupConnector`]).
//!
//! Wire types (the OBIE payloads) stay inside the connector; what comes out is
//! [`BankData`]: validated domain items, each with the bank's own JSON object,
//! and the count of every schema deviation that was read past.

mod berlin_group;
mod connector;
mod deviations;
mod error;
mod model;
mod obie;

pub use berlin_group::BerlinGroupConnector;
pub use connector::{
    BankData, Connector, ConnectorBuildError, ConnectorSettings, ConsentAccess, FetchFuture,
    InitialData, ProviderKind, UnknownProviderKind, build_connector,
};
pub use error::BankError;
pub use model::{Account, Amount, Balance, BankItem, CreditDebit, Transaction, TransactionStatus};
pub use obie::{ObieConnector, SCA_ERROR_CODE};
