//! Domain types a connector hands to the worker: validated, bank-neutral, each
//! item keeping the bank's own JSON object for the API to return as-is.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, FixedOffset, NaiveDate};
use serde_json::Value;

/// A non-negative decimal amount as the bank sent it: 1–13 integer digits and
/// at most 5 decimals (`^\d{1,13}$|^\d{1,13}\.\d{1,5}$`, the OBIE pattern).
///
/// Kept as the bank's string, never as a float, so nothing is rounded on the way
/// to storage. The sign lives in the item's [`CreditDebit`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Amount(String);

/// Why a string is not an [`Amount`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid amount {0:?}: expected 1-13 digits and at most 5 decimals")]
pub struct InvalidAmount(pub String);

impl Amount {
    /// Validates `s` against the OBIE amount pattern.
    pub fn parse(s: &str) -> Result<Self, InvalidAmount> {
        let (int, frac) = match s.split_once('.') {
            Some((int, frac)) => (int, Some(frac)),
            None => (s, None),
        };
        let digits = |p: &str, max: usize| {
            !p.is_empty() && p.len() <= max && p.bytes().all(|b| b.is_ascii_digit())
        };
        let ok = digits(int, 13) && frac.is_none_or(|f| digits(f, 5));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidAmount(s.to_owned()))
        }
    }

    /// The amount exactly as the bank wrote it, e.g. `"10.50"`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Amount {
    type Err = InvalidAmount;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, valid: bool) {
        assert_eq!(Amount::parse(input).is_ok(), valid, "{input:?}");
    }

    #[test]
    fn amount_pattern() {
        check("0", true);
        check("10", true);
        check("10.5", true);
        check("10.50", true);
        check("1234567890123", true);
        check("1234567890123.12345", true);
        check("12345678901234", false);
        check("1.123456", false);
        check("", false);
        check(".5", false);
        check("5.", false);
        check("-1.00", false);
        check("+1.00", false);
        check("1,00", false);
        check("1e3", false);
        check(" 1.00", false);
        check("1.00 ", false);
        check("1.0.0", false);
        check("١٢", false);
    }

    #[test]
    fn amount_keeps_the_bank_text() {
        let a = Amount::parse("007.10").unwrap();
        assert_eq!(a.as_str(), "007.10");
        assert_eq!(a.to_string(), "007.10");
    }
}
