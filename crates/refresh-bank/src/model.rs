//! Domain types a connector hands to the worker: validated, bank-neutral, each
//! item keeping the bank's own JSON object for the API to return as-is.

use chrono::{DateTime, FixedOffset, NaiveDate};
use serde_json::Value;

/// Amounts are the domain's: kept as the bank's decimal string, never a float, so
/// nothing is rounded on the way to storage. A connector hands over non-negative
/// amounts only; the sign lives in the item's [`CreditDebit`].
pub use refresh_core::Amount;

/// Whether an amount is money in (`Credit`) or out (`Debit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CreditDebit {
    Credit,
    Debit,
}

impl CreditDebit {
    /// The OBIE code, `Credit` or `Debit`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Credit => "Credit",
            Self::Debit => "Debit",
        }
    }
}

/// A transaction's status at the bank.
///
/// `Rejected` is passed on rather than dropped, so a stored pending transaction
/// the bank later rejects can be recognised by the merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransactionStatus {
    Booked,
    Pending,
    Rejected,
}

impl TransactionStatus {
    /// refreshd's code for it: `BOOKED`, `PENDING`, `REJECTED`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Booked => "BOOKED",
            Self::Pending => "PENDING",
            Self::Rejected => "REJECTED",
        }
    }
}

/// One account of the consent.
#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub account_id: String,
    /// OBIE `Status`, e.g. `Enabled`.
    pub status: Option<String>,
    /// ISO 4217 code, e.g. `GBP`.
    pub currency: Option<String>,
    /// OBIE `AccountType`: `Personal` or `Business`.
    pub account_type: Option<String>,
    /// OBIE `AccountSubType`, e.g. `CurrentAccount`.
    pub account_sub_type: Option<String>,
    pub nickname: Option<String>,
    pub description: Option<String>,
    /// `OpeningDate`; `None` when absent or not a date-time (the raw object still
    /// has the bank's text: an ambiguous date is not guessed at).
    pub opening_date: Option<DateTime<FixedOffset>>,
    /// The bank's object.
    pub raw: Value,
}

/// One balance of an account.
#[derive(Debug, Clone, PartialEq)]
pub struct Balance {
    pub account_id: String,
    /// OBIE `Type`, e.g. `InterimAvailable`, `InterimBooked`.
    pub balance_type: String,
    pub amount: Amount,
    pub currency: String,
    pub credit_debit: CreditDebit,
    pub date_time: DateTime<FixedOffset>,
    /// The bank's object.
    pub raw: Value,
}

/// One transaction of an account.
#[derive(Debug, Clone, PartialEq)]
pub struct Transaction {
    pub account_id: String,
    /// `None` when the bank gave none: such transactions are merged by date.
    pub transaction_id: Option<String>,
    pub status: TransactionStatus,
    pub booking_date_time: DateTime<FixedOffset>,
    /// The calendar date of `booking_date_time` in the offset the bank gave.
    pub booking_date: NaiveDate,
    pub value_date_time: Option<DateTime<FixedOffset>>,
    pub amount: Amount,
    pub currency: String,
    pub credit_debit: CreditDebit,
    /// OBIE `TransactionInformation`.
    pub description: Option<String>,
    /// OBIE `TransactionReference`.
    pub reference: Option<String>,
    /// The bank's object.
    pub raw: Value,
}

/// An item of a kind that is stored as the bank sent it (parties,
/// beneficiaries, direct debits, standing orders, scheduled payments,
/// statements, products). Its fields were checked on the way in (amounts in
/// particular), but only the account and the bank's id are lifted out.
#[derive(Debug, Clone, PartialEq)]
pub struct BankItem {
    pub account_id: String,
    /// The bank's id of the item (`PartyId`, `BeneficiaryId`, `DirectDebitId`,
    /// `StandingOrderId`, `ScheduledPaymentId`, `StatementId`, `ProductId`).
    pub id: Option<String>,
    /// The bank's object.
    pub raw: Value,
}
