//! Serde models of the OBIE v3.1 Account Information payloads we read, named
//! and spelled as in `account-info-openapi.yaml`.
//!
//! Only the fields refreshd uses or must check are typed; every struct ignores
//! unknown fields, optional fields may be absent. Amounts are `String`s: a JSON
//! number there is a type error, so a float never becomes an amount. Lists under
//! `Data` are read as [`Items`] so a single object in place of an array can be
//! recognised (and counted) rather than refused.
#![allow(non_snake_case)] // Field names are the OBIE spellings, on purpose.

use serde::Deserialize;
use serde_json::{Map, Value};

/// Every `OBRead…` envelope: `{Data, Links, Meta}`. Nothing in `Meta` changes
/// what is stored, so it is not read.
#[derive(Debug, Deserialize)]
pub(crate) struct OBRead<D> {
    pub(crate) Data: D,
    #[serde(default)]
    pub(crate) Links: Option<Links>,
}

/// `Links`. Only `Next` matters to a reader (`Self` is required by the schema
/// but not needed).
#[derive(Debug, Deserialize)]
pub(crate) struct Links {
    #[serde(default)]
    pub(crate) Next: Option<String>,
}

/// A list under `Data`: an array as the schema says, or one object.
#[derive(Debug)]
pub(crate) enum Items {
    Many(Vec<Value>),
    One(Map<String, Value>),
}

impl Items {
    /// Takes the value apart without copying it (an untagged enum would buffer and
    /// rebuild every item, on every page).
    fn from_value(value: Value) -> Result<Self, serde_json::Error> {
        match value {
            Value::Array(items) => Ok(Self::Many(items)),
            Value::Object(item) => Ok(Self::One(item)),
            other => Err(serde::de::Error::invalid_type(
                unexpected(&other),
                &"an array of objects or one object",
            )),
        }
    }
}

/// How serde names a JSON value's type in an error message.
fn unexpected(value: &Value) -> serde::de::Unexpected<'_> {
    use serde::de::Unexpected;
    match value {
        Value::Null => Unexpected::Unit,
        Value::Bool(b) => Unexpected::Bool(*b),
        Value::Number(_) => Unexpected::Other("a number"),
        Value::String(s) => Unexpected::Str(s),
        Value::Array(_) => Unexpected::Seq,
        Value::Object(_) => Unexpected::Map,
    }
}

/// The `Data` of a listing: its items, and `Links` if a bank put them inside
/// `Data` (a known deviation of the published Statements examples).
pub(crate) trait ReadData {
    fn into_parts(self) -> (Option<Items>, Option<Links>);
}

macro_rules! read_data {
    ($name:ident, $key:literal) => {
        /// Read through a map, so that a `Data` that is not an object is refused.
        #[derive(Debug, Deserialize)]
        #[serde(try_from = "Map<String, Value>")]
        pub(crate) struct $name {
            items: Option<Items>,
            links: Option<Links>,
        }

        impl TryFrom<Map<String, Value>> for $name {
            type Error = serde_json::Error;

            fn try_from(mut data: Map<String, Value>) -> Result<Self, Self::Error> {
                Ok(Self {
                    items: present(data.remove($key))
                        .map(Items::from_value)
                        .transpose()?,
                    links: present(data.remove("Links"))
                        .map(Links::deserialize)
                        .transpose()?,
                })
            }
        }

        impl ReadData for $name {
            fn into_parts(self) -> (Option<Items>, Option<Links>) {
                (self.items, self.links)
            }
        }
    };
}

/// A field that is there and not `null`.
fn present(value: Option<Value>) -> Option<Value> {
    value.filter(|v| !v.is_null())
}

read_data!(OBReadAccount6Data, "Account");
read_data!(OBReadBalance1Data, "Balance");
read_data!(OBReadDataTransaction6, "Transaction");
read_data!(OBReadParty3Data, "Party");
read_data!(OBReadBeneficiary5Data, "Beneficiary");
read_data!(OBReadDirectDebit2Data, "DirectDebit");
read_data!(OBReadStandingOrder6Data, "StandingOrder");
read_data!(OBReadScheduledPayment3Data, "ScheduledPayment");
read_data!(OBReadDataStatement2, "Statement");
read_data!(OBReadProduct2Data, "Product");

pub(crate) type OBReadAccount6 = OBRead<OBReadAccount6Data>;
pub(crate) type OBReadBalance1 = OBRead<OBReadBalance1Data>;
pub(crate) type OBReadTransaction6 = OBRead<OBReadDataTransaction6>;
/// Also reads `OBReadParty2` (`/party`), whose `Data.Party` is one object.
pub(crate) type OBReadParty3 = OBRead<OBReadParty3Data>;
pub(crate) type OBReadBeneficiary5 = OBRead<OBReadBeneficiary5Data>;
pub(crate) type OBReadDirectDebit2 = OBRead<OBReadDirectDebit2Data>;
pub(crate) type OBReadStandingOrder6 = OBRead<OBReadStandingOrder6Data>;
pub(crate) type OBReadScheduledPayment3 = OBRead<OBReadScheduledPayment3Data>;
pub(crate) type OBReadStatement2 = OBRead<OBReadDataStatement2>;
pub(crate) type OBReadProduct2 = OBRead<OBReadProduct2Data>;

/// `OBActiveOrHistoricCurrencyAndAmount`: `{Amount, Currency}`.
#[derive(Debug, Deserialize)]
pub(crate) struct OBActiveOrHistoricCurrencyAndAmount {
    pub(crate) Amount: String,
    pub(crate) Currency: String,
}

/// `OBCreditDebitCode`.
#[derive(Debug, Clone, Copy, Deserialize)]
pub(crate) enum OBCreditDebitCode {
    Credit,
    Debit,
}

/// `OBEntryStatus1Code`.
#[derive(Debug, Clone, Copy, Deserialize)]
pub(crate) enum OBEntryStatus1Code {
    Booked,
    Pending,
    Rejected,
}

/// `OBAccount6`.
#[derive(Debug, Deserialize)]
pub(crate) struct OBAccount6 {
    pub(crate) AccountId: String,
    #[serde(default)]
    pub(crate) Status: Option<String>,
    #[serde(default)]
    pub(crate) Currency: Option<String>,
    #[serde(default)]
    pub(crate) AccountType: Option<String>,
    #[serde(default)]
    pub(crate) AccountSubType: Option<String>,
    #[serde(default)]
    pub(crate) Description: Option<String>,
    #[serde(default)]
    pub(crate) Nickname: Option<String>,
    #[serde(default)]
    pub(crate) OpeningDate: Option<String>,
}

/// An item of `OBReadBalance1.Data.Balance` (inline in the schema).
#[derive(Debug, Deserialize)]
pub(crate) struct OBReadBalance1DataBalance {
    #[serde(default)]
    pub(crate) AccountId: Option<String>,
    pub(crate) CreditDebitIndicator: OBCreditDebitCode,
    pub(crate) Type: String,
    pub(crate) DateTime: String,
    pub(crate) Amount: OBActiveOrHistoricCurrencyAndAmount,
    #[serde(default)]
    pub(crate) LocalAmount: Option<OBActiveOrHistoricCurrencyAndAmount>,
    #[serde(default)]
    pub(crate) CreditLine: Option<Vec<OBCreditLine>>,
}

/// An item of a balance's `CreditLine`.
#[derive(Debug, Deserialize)]
pub(crate) struct OBCreditLine {
    #[serde(default)]
    pub(crate) Amount: Option<OBActiveOrHistoricCurrencyAndAmount>,
}

/// `OBTransaction6`.
#[derive(Debug, Deserialize)]
pub(crate) struct OBTransaction6 {
    #[serde(default)]
    pub(crate) AccountId: Option<String>,
    #[serde(default)]
    pub(crate) TransactionId: Option<String>,
    #[serde(default)]
    pub(crate) TransactionReference: Option<String>,
    pub(crate) CreditDebitIndicator: OBCreditDebitCode,
    pub(crate) Status: OBEntryStatus1Code,
    pub(crate) BookingDateTime: String,
    #[serde(default)]
    pub(crate) ValueDateTime: Option<String>,
    #[serde(default)]
    pub(crate) TransactionInformation: Option<String>,
    pub(crate) Amount: OBActiveOrHistoricCurrencyAndAmount,
    #[serde(default)]
    pub(crate) ChargeAmount: Option<OBActiveOrHistoricCurrencyAndAmount>,
    #[serde(default)]
    pub(crate) CurrencyExchange: Option<OBCurrencyExchange5>,
    #[serde(default)]
    pub(crate) Balance: Option<OBTransactionCashBalance>,
}

/// `OBCurrencyExchange5`.
#[derive(Debug, Deserialize)]
pub(crate) struct OBCurrencyExchange5 {
    #[serde(default)]
    pub(crate) InstructedAmount: Option<OBActiveOrHistoricCurrencyAndAmount>,
}

/// `OBTransactionCashBalance`.
#[derive(Debug, Deserialize)]
pub(crate) struct OBTransactionCashBalance {
    pub(crate) Amount: OBActiveOrHistoricCurrencyAndAmount,
}

/// `OBParty2`. `Address` and `Relationships` stay untyped here: their shape is
/// checked (and deviations counted) by the reader.
#[derive(Debug, Deserialize)]
pub(crate) struct OBParty2 {
    pub(crate) PartyId: String,
    #[serde(default)]
    pub(crate) Address: Option<Value>,
    #[serde(default)]
    pub(crate) Relationships: Option<Value>,
}

/// `OBBeneficiary5`.
#[derive(Debug, Deserialize)]
pub(crate) struct OBBeneficiary5 {
    #[serde(default)]
    pub(crate) AccountId: Option<String>,
    #[serde(default)]
    pub(crate) BeneficiaryId: Option<String>,
}

/// An item of `OBReadDirectDebit2.Data.DirectDebit` (inline in the schema).
#[derive(Debug, Deserialize)]
pub(crate) struct OBReadDirectDebit2DataDirectDebit {
    #[serde(default)]
    pub(crate) AccountId: Option<String>,
    #[serde(default)]
    pub(crate) DirectDebitId: Option<String>,
    #[serde(default)]
    pub(crate) PreviousPaymentAmount: Option<OBActiveOrHistoricCurrencyAndAmount>,
}

/// `OBStandingOrder6`.
#[derive(Debug, Deserialize)]
pub(crate) struct OBStandingOrder6 {
    #[serde(default)]
    pub(crate) AccountId: Option<String>,
    #[serde(default)]
    pub(crate) StandingOrderId: Option<String>,
    #[serde(default)]
    pub(crate) FirstPaymentAmount: Option<OBActiveOrHistoricCurrencyAndAmount>,
    #[serde(default)]
    pub(crate) NextPaymentAmount: Option<OBActiveOrHistoricCurrencyAndAmount>,
    #[serde(default)]
    pub(crate) LastPaymentAmount: Option<OBActiveOrHistoricCurrencyAndAmount>,
    #[serde(default)]
    pub(crate) FinalPaymentAmount: Option<OBActiveOrHistoricCurrencyAndAmount>,
}

/// `OBScheduledPayment3`.
#[derive(Debug, Deserialize)]
pub(crate) struct OBScheduledPayment3 {
    #[serde(default)]
    pub(crate) AccountId: Option<String>,
    #[serde(default)]
    pub(crate) ScheduledPaymentId: Option<String>,
    pub(crate) InstructedAmount: OBActiveOrHistoricCurrencyAndAmount,
}

/// `OBStatement2`.
#[derive(Debug, Deserialize)]
pub(crate) struct OBStatement2 {
    #[serde(default)]
    pub(crate) AccountId: Option<String>,
    #[serde(default)]
    pub(crate) StatementId: Option<String>,
    #[serde(default)]
    pub(crate) StatementBenefit: Option<Vec<OBStatementAmountItem>>,
    #[serde(default)]
    pub(crate) StatementFee: Option<Vec<OBStatementAmountItem>>,
    #[serde(default)]
    pub(crate) StatementInterest: Option<Vec<OBStatementAmountItem>>,
    #[serde(default)]
    pub(crate) StatementAmount: Option<Vec<OBStatementAmountItem>>,
    #[serde(default)]
    pub(crate) TotalValue: Option<OBActiveOrHistoricCurrencyAndAmount>,
}

/// The money part shared by `StatementBenefit`, `StatementFee`,
/// `StatementInterest` and `StatementAmount` items.
#[derive(Debug, Deserialize)]
pub(crate) struct OBStatementAmountItem {
    pub(crate) Amount: OBActiveOrHistoricCurrencyAndAmount,
    #[serde(default)]
    pub(crate) LocalAmount: Option<OBActiveOrHistoricCurrencyAndAmount>,
}

/// An item of `OBReadProduct2.Data.Product` (inline in the schema).
#[derive(Debug, Deserialize)]
pub(crate) struct OBReadProduct2DataProduct {
    #[serde(default)]
    pub(crate) AccountId: Option<String>,
    #[serde(default)]
    pub(crate) ProductId: Option<String>,
}

/// `OBErrorResponse1`, read leniently: only the error codes matter.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct OBErrorResponse1 {
    #[serde(default)]
    pub(crate) Errors: Vec<OBError1>,
}

/// `OBError1`.
#[derive(Debug, Deserialize)]
pub(crate) struct OBError1 {
    #[serde(default)]
    pub(crate) ErrorCode: Option<String>,
}
