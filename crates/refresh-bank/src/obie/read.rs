//! Reading OBIE response pages into domain items: tolerant where the meaning is
//! unambiguous (each deviation counted), strict where data would be wrong.
//!
//! Refused, as [`BankError::Malformed`]: invalid JSON, no `Data`, an amount that
//! is a JSON number or does not match the OBIE pattern, a currency that is not
//! three capital letters, an unknown `CreditDebitIndicator` or transaction
//! `Status`, a missing or unreadable required date-time, an item of another
//! account than the one asked for. Read past, and counted: see
//! [`crate::deviations`].

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, TimeZone, Utc};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::wire::{
    Items, OBAccount6, OBActiveOrHistoricCurrencyAndAmount, OBBeneficiary5, OBCreditDebitCode,
    OBEntryStatus1Code, OBParty2, OBRead, OBReadAccount6, OBReadBalance1,
    OBReadBalance1DataBalance, OBReadBeneficiary5, OBReadDirectDebit2,
    OBReadDirectDebit2DataDirectDebit, OBReadParty3, OBReadProduct2, OBReadProduct2DataProduct,
    OBReadScheduledPayment3, OBReadStandingOrder6, OBReadStatement2, OBReadTransaction6,
    OBScheduledPayment3, OBStandingOrder6, OBStatement2, OBTransaction6, ReadData,
};
use crate::deviations::{self as dv, Deviations};
use crate::error::BankError;
use crate::model::{
    Account, Amount, Balance, BankItem, CreditDebit, Transaction, TransactionStatus,
};

/// One page of a listing.
#[derive(Debug)]
pub(crate) struct Page<T> {
    pub(crate) items: Vec<T>,
    /// `Links.Next`, as the bank wrote it (absolute or relative).
    pub(crate) next: Option<String>,
}

/// The endpoints we read, per account except `Accounts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resource {
    Accounts,
    Balances,
    Transactions,
    Parties,
    Party,
    Beneficiaries,
    DirectDebits,
    StandingOrders,
    ScheduledPayments,
    Statements,
    Product,
}

impl Resource {
    /// The last path segment, e.g. `direct-debits`.
    pub(crate) fn segment(self) -> &'static str {
        match self {
            Self::Accounts => "accounts",
            Self::Balances => "balances",
            Self::Transactions => "transactions",
            Self::Parties => "parties",
            Self::Party => "party",
            Self::Beneficiaries => "beneficiaries",
            Self::DirectDebits => "direct-debits",
            Self::StandingOrders => "standing-orders",
            Self::ScheduledPayments => "scheduled-payments",
            Self::Statements => "statements",
            Self::Product => "product",
        }
    }
}

fn malformed(resource: Resource, msg: impl std::fmt::Display) -> BankError {
    BankError::Malformed(format!("{}: {msg}", resource.segment()))
}

/// The envelope: items (as raw objects) and the next-page link.
fn envelope<D>(
    body: &[u8],
    resource: Resource,
    dev: &mut Deviations,
) -> Result<(Vec<Value>, Option<String>), BankError>
where
    D: ReadData + DeserializeOwned,
{
    let page: OBRead<D> = serde_json::from_slice(body).map_err(|e| malformed(resource, e))?;
    let (items, data_links) = page.Data.into_parts();
    if data_links.is_some() {
        dev.note(dv::LINKS_INSIDE_DATA);
    }
    let links = match (page.Links, data_links) {
        (Some(links), _) => Some(links),
        (None, Some(links)) => Some(links),
        (None, None) => {
            dev.note(dv::LINKS_MISSING);
            None
        }
    };
    let items = match items {
        None => Vec::new(),
        Some(Items::Many(items)) => items,
        Some(Items::One(item)) => {
            // `/party` answers one object by design (OBReadParty2).
            if resource != Resource::Party {
                dev.note(if resource == Resource::Balances {
                    dv::BALANCE_OBJECT_NOT_ARRAY
                } else {
                    dv::ITEM_OBJECT_NOT_ARRAY
                });
            }
            vec![Value::Object(item)]
        }
    };
    let next = links
        .and_then(|l| l.Next)
        .filter(|next| !next.trim().is_empty());
    Ok((items, next))
}

fn typed<T: DeserializeOwned>(raw: &Value, resource: Resource, i: usize) -> Result<T, BankError> {
    T::deserialize(raw).map_err(|e| malformed(resource, format_args!("item {i}: {e}")))
}

/// Checks an amount and its currency; `what` names the field for the message.
fn money(m: &OBActiveOrHistoricCurrencyAndAmount, what: &str) -> Result<(Amount, String), String> {
    let amount = Amount::parse(&m.Amount).map_err(|e| format!("{what}: {e}"))?;
    if amount.is_negative() {
        // OBIE carries the sign in CreditDebitIndicator: a signed amount has two signs.
        return Err(format!(
            "{what}: negative amount {:?}: the sign belongs in CreditDebitIndicator",
            m.Amount
        ));
    }
    let c = m.Currency.as_bytes();
    if c.len() != 3 || !c.iter().all(u8::is_ascii_uppercase) {
        return Err(format!(
            "{what}: invalid currency {:?}: expected three capital letters",
            m.Currency
        ));
    }
    Ok((amount, m.Currency.clone()))
}

fn check_money(m: Option<&OBActiveOrHistoricCurrencyAndAmount>, what: &str) -> Result<(), String> {
    m.map_or(Ok(()), |m| money(m, what).map(drop))
}

/// An ISO 8601 date-time as OBIE writes them. Without an offset it is read as
/// UTC, and a bare date as its midnight UTC (both counted).
fn date_time(s: &str, dev: &mut Deviations) -> Option<DateTime<FixedOffset>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t);
    }
    // RFC 3339 wants the `T`, a seconds field and a colon in the offset; ISO 8601
    // as banks write it is looser.
    for format in ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%dT%H:%M%z"] {
        if let Ok(t) = DateTime::parse_from_str(s, format) {
            return Some(t);
        }
    }
    let naive = ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
        .or_else(|| {
            NaiveDate::parse_from_str(s, "%Y-%m-%d")
                .ok()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
        })?;
    dev.note(dv::DATE_TIME_WITHOUT_OFFSET);
    Some(Utc.from_utc_datetime(&naive).fixed_offset())
}

fn required_date_time(
    s: &str,
    field: &str,
    dev: &mut Deviations,
) -> Result<DateTime<FixedOffset>, String> {
    date_time(s, dev).ok_or_else(|| format!("{field}: not a date-time: {s:?}"))
}

fn optional_date_time(s: Option<&str>, dev: &mut Deviations) -> Option<DateTime<FixedOffset>> {
    let s = s?;
    let parsed = date_time(s, dev);
    if parsed.is_none() {
        dev.note(dv::DATE_TIME_INVALID);
    }
    parsed
}

/// The item's account: the one asked for, when the item names none; refused
/// when it names another.
fn account_of(
    found: Option<String>,
    expected: Option<&str>,
    dev: &mut Deviations,
) -> Result<String, String> {
    match (found, expected) {
        (Some(found), Some(expected)) if found != expected => Err(format!(
            "item of account {found:?} in the listing of account {expected:?}"
        )),
        (Some(found), _) => Ok(found),
        (None, Some(expected)) => {
            dev.note(dv::ACCOUNT_ID_MISSING);
            Ok(expected.to_owned())
        }
        (None, None) => Err("item without AccountId".to_owned()),
    }
}

fn credit_debit(code: OBCreditDebitCode) -> CreditDebit {
    match code {
        OBCreditDebitCode::Credit => CreditDebit::Credit,
        OBCreditDebitCode::Debit => CreditDebit::Debit,
    }
}

/// `GET /accounts` (`OBReadAccount6`).
pub(crate) fn accounts(body: &[u8], dev: &mut Deviations) -> Result<Page<Account>, BankError> {
    let r = Resource::Accounts;
    let (raws, next) = envelope::<<OBReadAccount6 as Envelope>::Data>(body, r, dev)?;
    let mut items = Vec::with_capacity(raws.len());
    for (i, raw) in raws.into_iter().enumerate() {
        let w: OBAccount6 = typed(&raw, r, i)?;
        let fail = |e: String| malformed(r, format_args!("item {i}: {e}"));
        if w.AccountId.trim().is_empty() {
            return Err(fail("empty AccountId".into()));
        }
        items.push(Account {
            opening_date: optional_date_time(w.OpeningDate.as_deref(), dev),
            account_id: w.AccountId,
            status: w.Status,
            currency: w.Currency,
            account_type: w.AccountType,
            account_sub_type: w.AccountSubType,
            nickname: w.Nickname,
            description: w.Description,
            raw,
        });
    }
    Ok(Page { items, next })
}

/// `GET /accounts/{AccountId}/balances` (`OBReadBalance1`); `account` is the
/// path's account, `None` for the bulk `/balances`.
pub(crate) fn balances(
    body: &[u8],
    account: Option<&str>,
    dev: &mut Deviations,
) -> Result<Page<Balance>, BankError> {
    let r = Resource::Balances;
    let (raws, next) = envelope::<<OBReadBalance1 as Envelope>::Data>(body, r, dev)?;
    if raws.is_empty() {
        dev.note(dv::BALANCE_ARRAY_EMPTY);
    }
    let mut items = Vec::with_capacity(raws.len());
    for (i, raw) in raws.into_iter().enumerate() {
        let w: OBReadBalance1DataBalance = typed(&raw, r, i)?;
        let item = (|| {
            let (amount, currency) = money(&w.Amount, "Amount")?;
            check_money(w.LocalAmount.as_ref(), "LocalAmount")?;
            for line in w.CreditLine.iter().flatten() {
                check_money(line.Amount.as_ref(), "CreditLine.Amount")?;
            }
            Ok::<_, String>(Balance {
                account_id: account_of(w.AccountId, account, dev)?,
                balance_type: w.Type,
                amount,
                currency,
                credit_debit: credit_debit(w.CreditDebitIndicator),
                date_time: required_date_time(&w.DateTime, "DateTime", dev)?,
                raw,
            })
        })()
        .map_err(|e| malformed(r, format_args!("item {i}: {e}")))?;
        items.push(item);
    }
    Ok(Page { items, next })
}

/// `GET /accounts/{AccountId}/transactions` (`OBReadTransaction6`).
pub(crate) fn transactions(
    body: &[u8],
    account: Option<&str>,
    dev: &mut Deviations,
) -> Result<Page<Transaction>, BankError> {
    let r = Resource::Transactions;
    let (raws, next) = envelope::<<OBReadTransaction6 as Envelope>::Data>(body, r, dev)?;
    let mut items = Vec::with_capacity(raws.len());
    for (i, raw) in raws.into_iter().enumerate() {
        let w: OBTransaction6 = typed(&raw, r, i)?;
        let item = (|| {
            let (amount, currency) = money(&w.Amount, "Amount")?;
            check_money(w.ChargeAmount.as_ref(), "ChargeAmount")?;
            if let Some(fx) = &w.CurrencyExchange {
                check_money(
                    fx.InstructedAmount.as_ref(),
                    "CurrencyExchange.InstructedAmount",
                )?;
            }
            if let Some(balance) = &w.Balance {
                money(&balance.Amount, "Balance.Amount")?;
            }
            let booking_date_time = required_date_time(&w.BookingDateTime, "BookingDateTime", dev)?;
            let transaction_id = match w.TransactionId {
                Some(id) if id.trim().is_empty() => {
                    dev.note(dv::TRANSACTION_ID_EMPTY);
                    None
                }
                id => id,
            };
            Ok::<_, String>(Transaction {
                account_id: account_of(w.AccountId, account, dev)?,
                transaction_id,
                status: match w.Status {
                    OBEntryStatus1Code::Booked => TransactionStatus::Booked,
                    OBEntryStatus1Code::Pending => TransactionStatus::Pending,
                    OBEntryStatus1Code::Rejected => TransactionStatus::Rejected,
                },
                booking_date: booking_date_time.date_naive(),
                booking_date_time,
                value_date_time: optional_date_time(w.ValueDateTime.as_deref(), dev),
                amount,
                currency,
                credit_debit: credit_debit(w.CreditDebitIndicator),
                description: w.TransactionInformation,
                reference: w.TransactionReference,
                raw,
            })
        })()
        .map_err(|e| malformed(r, format_args!("item {i}: {e}")))?;
        items.push(item);
    }
    Ok(Page { items, next })
}

/// `GET /accounts/{AccountId}/parties` (`OBReadParty3`) and `/party`
/// (`OBReadParty2`). Parties carry no `AccountId`: `account` is the path's.
pub(crate) fn parties(
    body: &[u8],
    resource: Resource,
    account: &str,
    dev: &mut Deviations,
) -> Result<Page<BankItem>, BankError> {
    let (raws, next) = envelope::<<OBReadParty3 as Envelope>::Data>(body, resource, dev)?;
    let mut items = Vec::with_capacity(raws.len());
    for (i, raw) in raws.into_iter().enumerate() {
        let w: OBParty2 = typed(&raw, resource, i)?;
        match &w.Address {
            Some(Value::Object(_)) => dev.note(dv::PARTY_ADDRESS_OBJECT_NOT_ARRAY),
            Some(Value::Array(_)) | Some(Value::Null) | None => {}
            Some(_) => {
                return Err(malformed(resource, format_args!("item {i}: Address")));
            }
        }
        match &w.Relationships {
            Some(Value::Array(_)) => dev.note(dv::PARTY_RELATIONSHIPS_ARRAY_NOT_OBJECT),
            Some(Value::Object(_)) | Some(Value::Null) | None => {}
            Some(_) => {
                return Err(malformed(resource, format_args!("item {i}: Relationships")));
            }
        }
        items.push(BankItem {
            account_id: account.to_owned(),
            id: Some(w.PartyId),
            raw,
        });
    }
    Ok(Page { items, next })
}

/// The per-account listings stored as the bank's objects: beneficiaries,
/// direct debits, standing orders, scheduled payments, statements, products.
pub(crate) fn bank_items(
    body: &[u8],
    resource: Resource,
    account: Option<&str>,
    dev: &mut Deviations,
) -> Result<Page<BankItem>, BankError> {
    let (raws, next) = match resource {
        Resource::Beneficiaries => {
            envelope::<<OBReadBeneficiary5 as Envelope>::Data>(body, resource, dev)?
        }
        Resource::DirectDebits => {
            envelope::<<OBReadDirectDebit2 as Envelope>::Data>(body, resource, dev)?
        }
        Resource::StandingOrders => {
            envelope::<<OBReadStandingOrder6 as Envelope>::Data>(body, resource, dev)?
        }
        Resource::ScheduledPayments => {
            envelope::<<OBReadScheduledPayment3 as Envelope>::Data>(body, resource, dev)?
        }
        Resource::Statements => {
            envelope::<<OBReadStatement2 as Envelope>::Data>(body, resource, dev)?
        }
        Resource::Product => envelope::<<OBReadProduct2 as Envelope>::Data>(body, resource, dev)?,
        Resource::Accounts
        | Resource::Balances
        | Resource::Transactions
        | Resource::Parties
        | Resource::Party => {
            return Err(malformed(resource, "not a bank-item listing"));
        }
    };
    let mut items = Vec::with_capacity(raws.len());
    for (i, raw) in raws.into_iter().enumerate() {
        let (found, id) = item_fields(&raw, resource, i)?;
        let account_id = account_of(found, account, dev)
            .map_err(|e| malformed(resource, format_args!("item {i}: {e}")))?;
        items.push(BankItem {
            account_id,
            id,
            raw,
        });
    }
    Ok(Page { items, next })
}

/// Checks one bank item's amounts; returns its `AccountId` and own id.
fn item_fields(
    raw: &Value,
    resource: Resource,
    i: usize,
) -> Result<(Option<String>, Option<String>), BankError> {
    let fields = match resource {
        Resource::Beneficiaries => {
            let w: OBBeneficiary5 = typed(raw, resource, i)?;
            Ok((w.AccountId, w.BeneficiaryId))
        }
        Resource::DirectDebits => {
            let w: OBReadDirectDebit2DataDirectDebit = typed(raw, resource, i)?;
            check_money(w.PreviousPaymentAmount.as_ref(), "PreviousPaymentAmount")
                .map(|()| (w.AccountId, w.DirectDebitId))
        }
        Resource::StandingOrders => {
            let w: OBStandingOrder6 = typed(raw, resource, i)?;
            check_money(w.FirstPaymentAmount.as_ref(), "FirstPaymentAmount")
                .and_then(|()| check_money(w.NextPaymentAmount.as_ref(), "NextPaymentAmount"))
                .and_then(|()| check_money(w.LastPaymentAmount.as_ref(), "LastPaymentAmount"))
                .and_then(|()| check_money(w.FinalPaymentAmount.as_ref(), "FinalPaymentAmount"))
                .map(|()| (w.AccountId, w.StandingOrderId))
        }
        Resource::ScheduledPayments => {
            let w: OBScheduledPayment3 = typed(raw, resource, i)?;
            money(&w.InstructedAmount, "InstructedAmount")
                .map(|_| (w.AccountId, w.ScheduledPaymentId))
        }
        Resource::Statements => {
            let w: OBStatement2 = typed(raw, resource, i)?;
            statement_money(&w).map(|()| (w.AccountId, w.StatementId))
        }
        Resource::Product => {
            let w: OBReadProduct2DataProduct = typed(raw, resource, i)?;
            Ok((w.AccountId, w.ProductId))
        }
        Resource::Accounts
        | Resource::Balances
        | Resource::Transactions
        | Resource::Parties
        | Resource::Party => Err("not a bank-item listing".to_owned()),
    };
    fields.map_err(|e| malformed(resource, format_args!("item {i}: {e}")))
}

fn statement_money(w: &OBStatement2) -> Result<(), String> {
    let lists = [
        ("StatementBenefit", &w.StatementBenefit),
        ("StatementFee", &w.StatementFee),
        ("StatementInterest", &w.StatementInterest),
        ("StatementAmount", &w.StatementAmount),
    ];
    for (what, list) in lists {
        for item in list.iter().flatten() {
            money(&item.Amount, what)?;
            check_money(item.LocalAmount.as_ref(), what)?;
        }
    }
    check_money(w.TotalValue.as_ref(), "TotalValue")
}

/// Names an envelope's `Data` type, so each reader above says which OBIE
/// payload it reads.
trait Envelope {
    type Data;
}

impl<D> Envelope for OBRead<D> {
    type Data = D;
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn transaction() -> Value {
        json!({
            "AccountId": "22289",
            "TransactionId": "123",
            "TransactionReference": "Ref 1",
            "Amount": {"Amount": "10.00", "Currency": "GBP"},
            "ChargeAmount": {"Amount": "0.50", "Currency": "GBP"},
            "CreditDebitIndicator": "Credit",
            "Status": "Booked",
            "BookingDateTime": "2017-04-05T10:43:07+00:00",
            "ValueDateTime": "2017-04-05T10:45:22+00:00",
            "TransactionInformation": "Cash from Aubrey",
            "Balance": {
                "Amount": {"Amount": "230.00", "Currency": "GBP"},
                "CreditDebitIndicator": "Credit",
                "Type": "InterimBooked"
            }
        })
    }

    /// Sets (or with `None` removes) the field at `pointer` of `item`.
    fn patch(mut item: Value, pointer: &str, value: Option<Value>) -> Value {
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        let parent = item.pointer_mut(parent).unwrap().as_object_mut().unwrap();
        match value {
            Some(v) => parent.insert(key.to_owned(), v),
            None => parent.remove(key),
        };
        item
    }

    /// `ok`, `ok kind1,kind2` with the deviations counted, or `malformed`.
    fn outcome<T>(r: Result<Page<T>, BankError>, dev: Deviations) -> String {
        match r {
            Ok(_) if dev.is_empty() => "ok".to_owned(),
            Ok(_) => {
                let kinds: Vec<_> = dev.into_map().into_keys().collect();
                format!("ok {}", kinds.join(","))
            }
            Err(BankError::Malformed(_)) => "malformed".to_owned(),
            Err(e) => format!("unexpected {e:?}"),
        }
    }

    fn check_tx(pointer: &str, value: Option<Value>, expected: &str) {
        let page = json!({
            "Data": {"Transaction": [patch(transaction(), pointer, value.clone())]},
            "Links": {"Self": "https://bank.example/accounts/22289/transactions"}
        });
        let mut dev = Deviations::default();
        let r = transactions(page.to_string().as_bytes(), Some("22289"), &mut dev);
        assert_eq!(outcome(r, dev), expected, "{pointer} = {value:?}");
    }

    #[test]
    fn transaction_fields() {
        check_tx("/Extra", Some(json!({"any": 1})), "ok");
        check_tx("/Amount/Amount", Some(json!("10")), "ok");
        check_tx("/Amount/Amount", Some(json!("10.12345")), "ok");
        check_tx("/Amount/Amount", Some(json!(10.5)), "malformed");
        check_tx("/Amount/Amount", Some(json!(10)), "malformed");
        check_tx("/Amount/Amount", Some(json!("10.123456")), "malformed");
        // Wider than the OBIE pattern but what the domain stores (NextGenPSD2 sizes).
        check_tx("/Amount/Amount", Some(json!("12345678901234.50")), "ok");
        check_tx(
            "/Amount/Amount",
            Some(json!("1234567890123456789")),
            "malformed",
        );
        check_tx("/Amount/Amount", Some(json!("-10.00")), "malformed");
        check_tx("/Amount/Amount", Some(json!("1e3")), "malformed");
        check_tx("/Amount/Amount", None, "malformed");
        check_tx("/Amount", None, "malformed");
        check_tx("/Amount/Currency", Some(json!("gbp")), "malformed");
        check_tx("/Amount/Currency", Some(json!("GBPX")), "malformed");
        check_tx("/ChargeAmount/Amount", Some(json!(0.5)), "malformed");
        check_tx("/ChargeAmount", None, "ok");
        check_tx("/Balance/Amount/Amount", Some(json!(230.0)), "malformed");
        check_tx(
            "/CurrencyExchange",
            Some(json!({"SourceCurrency": "USD", "ExchangeRate": 1.27,
                        "InstructedAmount": {"Amount": "12.70", "Currency": "USD"}})),
            "ok",
        );
        check_tx(
            "/CurrencyExchange",
            Some(json!({"SourceCurrency": "USD", "ExchangeRate": 1.27,
                        "InstructedAmount": {"Amount": 12.7, "Currency": "USD"}})),
            "malformed",
        );
        check_tx("/CreditDebitIndicator", Some(json!("credit")), "malformed");
        check_tx("/CreditDebitIndicator", None, "malformed");
        check_tx("/Status", Some(json!("Pending")), "ok");
        check_tx("/Status", Some(json!("Rejected")), "ok");
        check_tx("/Status", Some(json!("BOOKED")), "malformed");
        check_tx("/BookingDateTime", None, "malformed");
        check_tx("/BookingDateTime", Some(json!("05/04/2017")), "malformed");
        check_tx(
            "/BookingDateTime",
            Some(json!("2017-04-05T10:43:07Z")),
            "ok",
        );
        check_tx(
            "/BookingDateTime",
            Some(json!("2017-04-05T10:43:07.123+01:00")),
            "ok",
        );
        check_tx(
            "/BookingDateTime",
            Some(json!("2017-04-05T10:43:07")),
            "ok date_time_without_offset",
        );
        check_tx(
            "/BookingDateTime",
            Some(json!("2017-04-05")),
            "ok date_time_without_offset",
        );
        check_tx(
            "/ValueDateTime",
            Some(json!("soon")),
            "ok date_time_invalid",
        );
        check_tx("/TransactionId", None, "ok");
        check_tx("/TransactionId", Some(json!("")), "ok transaction_id_empty");
        check_tx("/TransactionId", Some(json!(123)), "malformed");
        check_tx("/AccountId", None, "ok account_id_missing");
        check_tx("/AccountId", Some(json!("31820")), "malformed");
    }

    #[test]
    fn transaction_domain_values() {
        let item = patch(
            transaction(),
            "/BookingDateTime",
            Some(json!("2017-04-05T23:30:00-02:00")),
        );
        let page = json!({"Data": {"Transaction": [item]}, "Links": {"Self": "x"}});
        let mut dev = Deviations::default();
        let t = transactions(page.to_string().as_bytes(), Some("22289"), &mut dev)
            .unwrap()
            .items
            .remove(0);
        // The bank's calendar date, not the UTC one (which is the 6th).
        assert_eq!(t.booking_date.to_string(), "2017-04-05");
        assert_eq!(t.status, TransactionStatus::Booked);
        assert_eq!(t.credit_debit, CreditDebit::Credit);
        assert_eq!(t.reference.as_deref(), Some("Ref 1"));
        assert_eq!(t.raw["ChargeAmount"]["Amount"], "0.50");
    }

    fn check_envelope(body: &str, expected: &str) {
        let mut dev = Deviations::default();
        let r = transactions(body.as_bytes(), Some("22289"), &mut dev);
        assert_eq!(outcome(r, dev), expected, "{body}");
    }

    #[test]
    fn envelopes() {
        check_envelope(r#"{"Data": {}, "Links": {"Self": "x"}}"#, "ok");
        check_envelope(
            r#"{"Data": {"Transaction": []}, "Links": {"Self": "x"}}"#,
            "ok",
        );
        check_envelope(r#"{"Data": {"Transaction": []}}"#, "ok links_missing");
        check_envelope(
            r#"{"Data": {"Transaction": [], "Links": {"Self": "x"}}}"#,
            "ok links_inside_data",
        );
        check_envelope(r#"{"Links": {"Self": "x"}}"#, "malformed");
        check_envelope(r#"{"Data": []}"#, "malformed");
        check_envelope(r#"{"Data": {"Transaction": "none"}}"#, "malformed");
        check_envelope(r#"{"Data": {"Transaction": [1]}}"#, "malformed");
        check_envelope(
            r#"{"Data": {"Transaction": []}, "Links": "x"}"#,
            "malformed",
        );
        check_envelope("", "malformed");
        check_envelope("<html>", "malformed");
        check_envelope(r#"{"Data": {"Transaction": []}"#, "malformed");
    }

    #[test]
    fn next_links() {
        let mut dev = Deviations::default();
        let next = |body: &str, dev: &mut Deviations| {
            transactions(body.as_bytes(), None, dev).unwrap().next
        };
        assert_eq!(
            next(
                r#"{"Data": {}, "Links": {"Self": "a", "Next": "b?page=2"}}"#,
                &mut dev
            ),
            Some("b?page=2".to_owned())
        );
        assert_eq!(
            next(
                r#"{"Data": {}, "Links": {"Self": "a", "Next": ""}}"#,
                &mut dev
            ),
            None
        );
        assert_eq!(
            next(r#"{"Data": {"Links": {"Next": "c"}}}"#, &mut dev),
            Some("c".to_owned())
        );
    }

    fn check_balance(pointer: &str, value: Option<Value>, expected: &str) {
        let item = json!({
            "AccountId": "22289",
            "Amount": {"Amount": "300.00", "Currency": "GBP"},
            "CreditDebitIndicator": "Credit",
            "Type": "InterimAvailable",
            "DateTime": "2017-04-05T10:43:07+00:00",
            "CreditLine": [{"Included": false, "Amount": {"Amount": "500.00", "Currency": "GBP"}, "Type": "Available"}]
        });
        let page = json!({"Data": {"Balance": [patch(item, pointer, value.clone())]}, "Links": {"Self": "x"}});
        let mut dev = Deviations::default();
        let r = balances(page.to_string().as_bytes(), Some("22289"), &mut dev);
        assert_eq!(outcome(r, dev), expected, "{pointer} = {value:?}");
    }

    #[test]
    fn balance_fields() {
        check_balance("/Extra", Some(json!(true)), "ok");
        check_balance("/Amount/Amount", Some(json!(300.0)), "malformed");
        check_balance("/Amount/Amount", Some(json!("300,00")), "malformed");
        check_balance("/CreditLine/0/Amount/Amount", Some(json!(500)), "malformed");
        check_balance(
            "/LocalAmount",
            Some(json!({"Amount": "1.2.3", "Currency": "USD"})),
            "malformed",
        );
        check_balance("/DateTime", None, "malformed");
        check_balance("/Type", None, "malformed");
        check_balance("/CreditDebitIndicator", Some(json!("Both")), "malformed");
        check_balance("/AccountId", Some(json!("31820")), "malformed");
        check_balance("/AccountId", None, "ok account_id_missing");
        let mut dev = Deviations::default();
        let r = balances(
            br#"{"Data": {"Balance": []}, "Links": {"Self": "x"}}"#,
            None,
            &mut dev,
        );
        assert_eq!(outcome(r, dev), "ok balance_array_empty");
    }

    fn check_item(resource: Resource, item: Value, expected: &str) {
        let key = match resource {
            Resource::Beneficiaries => "Beneficiary",
            Resource::DirectDebits => "DirectDebit",
            Resource::StandingOrders => "StandingOrder",
            Resource::ScheduledPayments => "ScheduledPayment",
            Resource::Statements => "Statement",
            Resource::Product => "Product",
            other => panic!("{other:?}"),
        };
        let page = json!({"Data": {key: [&item]}, "Links": {"Self": "x"}});
        let mut dev = Deviations::default();
        let r = bank_items(page.to_string().as_bytes(), resource, Some("1"), &mut dev);
        if let Ok(p) = &r {
            assert_eq!(p.items[0].raw, item);
        }
        assert_eq!(outcome(r, dev), expected, "{resource:?} {item}");
    }

    #[test]
    fn bank_item_amounts() {
        use Resource::*;
        let m = |a: Value| json!({"Amount": a, "Currency": "GBP"});
        check_item(
            Beneficiaries,
            json!({"AccountId": "1", "BeneficiaryId": "b"}),
            "ok",
        );
        check_item(Beneficiaries, json!({"AccountId": "2"}), "malformed");
        check_item(
            DirectDebits,
            json!({"AccountId": "1", "MandateIdentification": "m", "Name": "n", "PreviousPaymentAmount": m(json!("1.00"))}),
            "ok",
        );
        check_item(
            DirectDebits,
            json!({"AccountId": "1", "PreviousPaymentAmount": m(json!(1.0))}),
            "malformed",
        );
        check_item(
            StandingOrders,
            json!({"AccountId": "1", "Frequency": "EvryDay", "NextPaymentAmount": m(json!("5"))}),
            "ok",
        );
        check_item(
            StandingOrders,
            json!({"AccountId": "1", "FinalPaymentAmount": m(json!("5.123456"))}),
            "malformed",
        );
        check_item(
            ScheduledPayments,
            json!({"AccountId": "1", "InstructedAmount": m(json!("7.00"))}),
            "ok",
        );
        check_item(ScheduledPayments, json!({"AccountId": "1"}), "malformed");
        check_item(
            Statements,
            json!({"AccountId": "1", "StatementAmount": [{"Amount": m(json!("1.00")), "CreditDebitIndicator": "Credit", "Type": "UK.OBIE.ClosingBalance"}]}),
            "ok",
        );
        check_item(
            Statements,
            json!({"AccountId": "1", "StatementFee": [{"Amount": m(json!(1))}]}),
            "malformed",
        );
        check_item(
            Statements,
            json!({"AccountId": "1", "TotalValue": m(json!("x"))}),
            "malformed",
        );
        check_item(
            Product,
            json!({"AccountId": "1", "ProductId": "p", "ProductType": "Other"}),
            "ok",
        );
        check_item(Product, json!({"ProductId": "p"}), "ok account_id_missing");
    }
}
