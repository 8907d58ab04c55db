//! Reading NextGenPSD2 1.3 response bodies into domain items: tolerant where the
//! meaning is unambiguous (each deviation counted, in the same metric as OBIE's),
//! strict where data would be wrong.
//!
//! Refused, as [`BankError::Malformed`]: invalid JSON, a missing list, an amount
//! that is a JSON number or not a decimal, a currency that is not three capital
//! letters, an account without `resourceId`, a transaction without any date
//! (`bookingDate`, `valueDate`, `transactionDate`), a balance without
//! `balanceType`.

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveTime, Utc};
use serde_json::{Map, Value};

use crate::deviations::{self as dv, Deviations};
use crate::error::BankError;
use crate::model::{Account, Amount, Balance, CreditDebit, Transaction, TransactionStatus};

/// One page of transactions.
#[derive(Debug)]
pub(crate) struct Page<T> {
    pub(crate) items: Vec<T>,
    /// `_links.next.href`, as the bank wrote it (absolute or relative).
    pub(crate) next: Option<String>,
}

fn malformed(what: &str, detail: impl std::fmt::Display) -> BankError {
    BankError::Malformed(format!("{what}: {detail}"))
}

fn object(body: &[u8], what: &str) -> Result<Map<String, Value>, BankError> {
    serde_json::from_slice::<Map<String, Value>>(body)
        .map_err(|e| malformed(what, format_args!("not a JSON object: {e}")))
}

/// A list under `key`; one object where an array belongs is read as a list of one.
fn list<'a>(
    map: &'a Map<String, Value>,
    key: &str,
    what: &str,
    dev: &mut Deviations,
) -> Result<Vec<&'a Map<String, Value>>, BankError> {
    let items: Vec<&Value> = match map.get(key) {
        Some(Value::Array(items)) => items.iter().collect(),
        Some(one @ Value::Object(_)) => {
            dev.note(dv::ITEM_OBJECT_NOT_ARRAY);
            vec![one]
        }
        Some(Value::Null) | None => return Err(malformed(what, format_args!("no {key:?} list"))),
        Some(_) => return Err(malformed(what, format_args!("{key:?} is not a list"))),
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_object()
                .ok_or_else(|| malformed(what, format_args!("{key} item {i} is not an object")))
        })
        .collect()
}

fn text(map: &Map<String, Value>, key: &str) -> Option<String> {
    map.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// `{"amount": "-12.30", "currency": "EUR"}`: the unsigned amount, its direction
/// (the sign), and the currency.
fn money(v: Option<&Value>, what: &str) -> Result<(Amount, CreditDebit, String), BankError> {
    let m = v
        .and_then(Value::as_object)
        .ok_or_else(|| malformed(what, "no amount object"))?;
    let raw = match m.get("amount") {
        Some(Value::String(s)) => s.as_str(),
        Some(Value::Number(_)) => {
            return Err(malformed(what, "amount is a JSON number, not a string"));
        }
        _ => return Err(malformed(what, "no amount")),
    };
    let (direction, unsigned) = match raw.strip_prefix('-') {
        Some(rest) => (CreditDebit::Debit, rest),
        None => (CreditDebit::Credit, raw),
    };
    let amount = Amount::parse(unsigned).map_err(|e| malformed(what, e))?;
    let currency = m
        .get("currency")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let c = currency.as_bytes();
    if c.len() != 3 || !c.iter().all(u8::is_ascii_uppercase) {
        return Err(malformed(
            what,
            format_args!("invalid currency {currency:?}: expected three capital letters"),
        ));
    }
    Ok((amount, direction, currency.to_owned()))
}

/// An ISO date (`2026-11-30`); a date-time there is read as its date (counted).
fn date(map: &Map<String, Value>, key: &str, dev: &mut Deviations) -> Option<NaiveDate> {
    let s = map.get(key)?.as_str()?;
    if let Ok(d) = s.parse::<NaiveDate>() {
        return Some(d);
    }
    match DateTime::parse_from_rfc3339(s) {
        Ok(t) => {
            dev.note(dv::DATE_TIME_INVALID);
            Some(t.date_naive())
        }
        Err(_) => {
            dev.note(dv::DATE_TIME_INVALID);
            None
        }
    }
}

fn midnight(d: NaiveDate) -> DateTime<FixedOffset> {
    d.and_time(NaiveTime::MIN).and_utc().fixed_offset()
}

/// The bank-neutral fields use the OBIE code lists: `enabled` → `Enabled`,
/// `blocked` → `Disabled`, `deleted` → `Deleted`; others as given.
fn account_status(s: &str) -> String {
    match s {
        "enabled" => "Enabled".into(),
        "blocked" => "Disabled".into(),
        "deleted" => "Deleted".into(),
        other => other.into(),
    }
}

/// `PRIV` → `Personal`, `ORGA` → `Business`.
fn account_usage(s: &str) -> String {
    match s {
        "PRIV" => "Personal".into(),
        "ORGA" => "Business".into(),
        other => other.into(),
    }
}

/// ISO 20022 cash account types as OBIE sub-types where one matches.
fn cash_account_type(s: &str) -> String {
    match s {
        "CACC" | "TRAN" => "CurrentAccount".into(),
        "SVGS" | "MOMA" => "Savings".into(),
        "CARD" => "CreditCard".into(),
        "LOAN" => "Loan".into(),
        "MGLD" => "Mortgage".into(),
        other => other.into(),
    }
}

/// A NextGenPSD2 `balanceType` in the OBIE spelling the stored shape uses
/// (`interimAvailable` → `InterimAvailable`).
fn balance_type(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// `GET /v1/accounts`: `{"accounts": [...]}`.
pub(crate) fn accounts(body: &[u8], dev: &mut Deviations) -> Result<Vec<Account>, BankError> {
    let map = object(body, "accounts")?;
    list(&map, "accounts", "accounts", dev)?
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            let account_id = text(a, "resourceId")
                .ok_or_else(|| malformed("accounts", format_args!("item {i}: no resourceId")))?;
            Ok(Account {
                account_id,
                status: text(a, "status").map(|s| account_status(&s)),
                currency: text(a, "currency"),
                account_type: text(a, "usage").map(|u| account_usage(&u)),
                account_sub_type: text(a, "cashAccountType").map(|c| cash_account_type(&c)),
                nickname: text(a, "name"),
                description: text(a, "product"),
                opening_date: None,
                raw: Value::Object(a.clone()),
            })
        })
        .collect()
}

/// `GET /v1/accounts/{id}/balances`: `{"account": ..., "balances": [...]}`. A
/// balance without a time is taken as of `now` (the moment it was read).
pub(crate) fn balances(
    body: &[u8],
    account_id: &str,
    now: DateTime<Utc>,
    dev: &mut Deviations,
) -> Result<Vec<Balance>, BankError> {
    let map = object(body, "balances")?;
    list(&map, "balances", "balances", dev)?
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            let what = format!("balances: item {i}");
            let balance_type = text(b, "balanceType")
                .map(|t| balance_type(&t))
                .ok_or_else(|| malformed(&what, "no balanceType"))?;
            let (amount, credit_debit, currency) = money(b.get("balanceAmount"), &what)?;
            let date_time = match b.get("lastChangeDateTime").and_then(Value::as_str) {
                Some(s) => match DateTime::parse_from_rfc3339(s) {
                    Ok(t) => Some(t),
                    Err(_) => {
                        dev.note(dv::DATE_TIME_INVALID);
                        None
                    }
                },
                None => None,
            }
            .or_else(|| date(b, "referenceDate", dev).map(midnight))
            .unwrap_or_else(|| now.fixed_offset());
            Ok(Balance {
                account_id: account_id.to_owned(),
                balance_type,
                amount,
                currency,
                credit_debit,
                date_time,
                raw: Value::Object(b.clone()),
            })
        })
        .collect()
}

/// `GET /v1/accounts/{id}/transactions?bookingStatus=both`:
/// `{"account": ..., "transactions": {"booked": [...], "pending": [...], "_links": {...}}}`.
/// Pending ones first, so a transaction listed in both is taken as booked.
pub(crate) fn transactions(
    body: &[u8],
    account_id: &str,
    dev: &mut Deviations,
) -> Result<Page<Transaction>, BankError> {
    let map = object(body, "transactions")?;
    let Some(report) = map.get("transactions").and_then(Value::as_object) else {
        return Err(malformed("transactions", "no \"transactions\" report"));
    };
    let mut items = Vec::new();
    for (key, status) in [
        ("pending", TransactionStatus::Pending),
        ("booked", TransactionStatus::Booked),
    ] {
        if report.get(key).is_none_or(Value::is_null) {
            continue;
        }
        for (i, t) in list(report, key, "transactions", dev)?
            .into_iter()
            .enumerate()
        {
            items.push(transaction(
                t,
                account_id,
                status,
                &format!("{key} item {i}"),
                dev,
            )?);
        }
    }
    let next = match report.get("_links").or_else(|| map.get("_links")) {
        Some(links) => next_link(links, dev),
        None => None,
    };
    Ok(Page { items, next })
}

/// `_links.next`: `{"href": "..."}` as the schema says, or a bare string (counted).
fn next_link(links: &Value, dev: &mut Deviations) -> Option<String> {
    match links.get("next")? {
        Value::Object(o) => o.get("href").and_then(Value::as_str).map(str::to_owned),
        Value::String(s) => {
            dev.note(dv::LINK_NOT_OBJECT);
            Some(s.clone())
        }
        _ => None,
    }
}

fn transaction(
    t: &Map<String, Value>,
    account_id: &str,
    status: TransactionStatus,
    what: &str,
    dev: &mut Deviations,
) -> Result<Transaction, BankError> {
    let what = format!("transactions: {what}");
    let (amount, credit_debit, currency) = money(t.get("transactionAmount"), &what)?;
    let booking = date(t, "bookingDate", dev);
    let value = date(t, "valueDate", dev);
    // Pending items often have no booking date yet: the same-date rule then uses
    // the value date, or the transaction date.
    let booking_date = match booking {
        Some(d) => d,
        None => {
            if status == TransactionStatus::Booked {
                dev.note(dv::BOOKING_DATE_MISSING);
            }
            value
                .or_else(|| date(t, "transactionDate", dev))
                .ok_or_else(|| malformed(&what, "no bookingDate, valueDate or transactionDate"))?
        }
    };
    // `transactionId` is optional; `entryReference` stands in for it where given.
    let transaction_id = text(t, "transactionId").or_else(|| text(t, "entryReference"));
    if transaction_id.is_none()
        && (t.get("transactionId").is_some() || t.get("entryReference").is_some())
    {
        dev.note(dv::TRANSACTION_ID_EMPTY);
    }
    let description = text(t, "remittanceInformationUnstructured").or_else(|| {
        t.get("remittanceInformationUnstructuredArray")
            .and_then(Value::as_array)
            .map(|lines| {
                lines
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .filter(|s| !s.is_empty())
            .or_else(|| text(t, "additionalInformation"))
    });
    Ok(Transaction {
        account_id: account_id.to_owned(),
        transaction_id,
        status,
        booking_date_time: midnight(booking_date),
        booking_date,
        value_date_time: value.map(midnight),
        amount,
        currency,
        credit_debit,
        description,
        reference: text(t, "endToEndId"),
        raw: Value::Object(t.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(report: Value) -> Result<(Page<Transaction>, Vec<&'static str>), BankError> {
        let mut dev = Deviations::default();
        let body = json!({"account": {"iban": "DE02"}, "transactions": report}).to_string();
        let page = transactions(body.as_bytes(), "acc-1", &mut dev)?;
        Ok((page, dev.into_map().into_keys().collect()))
    }

    fn booked(extra: Value) -> Value {
        let mut t = json!({"transactionId": "t1", "bookingDate": "2026-11-30", "valueDate": "2026-11-30",
                           "transactionAmount": {"currency": "EUR", "amount": "-12.30"},
                           "remittanceInformationUnstructured": "shop"});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                t.as_object_mut().unwrap().remove(k);
            } else {
                t[k] = v.clone();
            }
        }
        t
    }

    /// `ok`, `ok kinds`, or `malformed`, for one booked transaction patched by `extra`.
    fn check(extra: Value, expected: &str) {
        let got = match read(json!({"booked": [booked(extra.clone())], "_links": {}})) {
            Ok((_, kinds)) if kinds.is_empty() => "ok".to_owned(),
            Ok((_, kinds)) => format!("ok {}", kinds.join(",")),
            Err(BankError::Malformed(_)) => "malformed".to_owned(),
            Err(e) => format!("unexpected {e:?}"),
        };
        assert_eq!(got, expected, "{extra}");
    }

    #[test]
    fn transaction_fields() {
        check(json!({}), "ok");
        check(json!({"transactionId": null}), "ok");
        check(json!({"transactionId": ""}), "ok transaction_id_empty");
        check(
            json!({"transactionAmount": {"currency": "EUR", "amount": -12.3}}),
            "malformed",
        );
        check(
            json!({"transactionAmount": {"currency": "EUR", "amount": "12,30"}}),
            "malformed",
        );
        check(
            json!({"transactionAmount": {"currency": "eur", "amount": "12.30"}}),
            "malformed",
        );
        check(
            json!({"transactionAmount": {"currency": "EUR", "amount": "12345678901234.123"}}),
            "ok",
        );
        check(json!({"transactionAmount": null}), "malformed");
        check(json!({"bookingDate": null}), "ok booking_date_missing");
        check(json!({"bookingDate": null, "valueDate": null}), "malformed");
        check(
            json!({"bookingDate": null, "valueDate": null, "transactionDate": "2026-11-29"}),
            "ok booking_date_missing",
        );
        check(
            json!({"bookingDate": "2026-11-30T10:00:00Z"}),
            "ok date_time_invalid",
        );
    }

    #[test]
    fn booked_pending_ids_amounts_and_links() {
        let (page, kinds) = read(json!({
            "booked": [booked(json!({})), booked(json!({"transactionId": null, "entryReference": "E7",
                "transactionAmount": {"currency": "EUR", "amount": "100.00"}}))],
            "pending": [{"transactionAmount": {"currency": "EUR", "amount": "-5.00"}, "valueDate": "2026-12-01"}],
            "_links": {"next": {"href": "/v1/accounts/acc-1/transactions?page=2"}}
        }))
        .unwrap();
        assert!(kinds.is_empty(), "{kinds:?}");
        let got: Vec<_> = page
            .items
            .iter()
            .map(|t| {
                (
                    t.transaction_id.clone(),
                    t.status,
                    t.booking_date.to_string(),
                    t.amount.to_string(),
                    t.credit_debit,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    None,
                    TransactionStatus::Pending,
                    "2026-12-01".into(),
                    "5.00".into(),
                    CreditDebit::Debit
                ),
                (
                    Some("t1".into()),
                    TransactionStatus::Booked,
                    "2026-11-30".into(),
                    "12.30".into(),
                    CreditDebit::Debit
                ),
                (
                    Some("E7".into()),
                    TransactionStatus::Booked,
                    "2026-11-30".into(),
                    "100.00".into(),
                    CreditDebit::Credit
                ),
            ]
        );
        assert_eq!(page.items[1].description.as_deref(), Some("shop"));
        assert_eq!(
            page.next.as_deref(),
            Some("/v1/accounts/acc-1/transactions?page=2")
        );
        let (page, kinds) =
            read(json!({"booked": [], "_links": {"next": "https://bank/p2"}})).unwrap();
        assert_eq!(
            (page.next.as_deref(), kinds),
            (Some("https://bank/p2"), vec!["link_not_object"])
        );
        assert!(matches!(read(json!(null)), Err(BankError::Malformed(_))));
    }

    #[test]
    fn accounts_and_balances() {
        let mut dev = Deviations::default();
        let body = json!({"accounts": [{"resourceId": "a1", "iban": "DE02", "currency": "EUR", "name": "Main",
                                         "cashAccountType": "CACC", "status": "enabled"}]});
        let accounts = accounts(body.to_string().as_bytes(), &mut dev).unwrap();
        assert_eq!(
            (
                accounts[0].account_id.as_str(),
                accounts[0].nickname.as_deref()
            ),
            ("a1", Some("Main"))
        );
        let bad = json!({"accounts": [{"iban": "DE02"}]});
        assert!(super::accounts(bad.to_string().as_bytes(), &mut dev).is_err());

        let now = DateTime::parse_from_rfc3339("2026-12-02T03:00:00Z")
            .unwrap()
            .to_utc();
        let body = json!({"balances": [
            {"balanceType": "closingBooked", "balanceAmount": {"currency": "EUR", "amount": "500.00"}, "referenceDate": "2026-12-01"},
            {"balanceType": "interimAvailable", "balanceAmount": {"currency": "EUR", "amount": "-20.5"},
             "lastChangeDateTime": "2026-12-02T01:00:00+01:00"},
            {"balanceType": "expected", "balanceAmount": {"currency": "EUR", "amount": "480.00"}}
        ]});
        let got: Vec<_> = balances(body.to_string().as_bytes(), "a1", now, &mut dev)
            .unwrap()
            .into_iter()
            .map(|b| {
                (
                    b.balance_type,
                    b.amount.to_string(),
                    b.credit_debit,
                    b.date_time.to_utc().to_rfc3339(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "ClosingBooked".into(),
                    "500.00".into(),
                    CreditDebit::Credit,
                    "2026-12-01T00:00:00+00:00".into()
                ),
                (
                    "InterimAvailable".into(),
                    "20.5".into(),
                    CreditDebit::Debit,
                    "2026-12-02T00:00:00+00:00".into()
                ),
                (
                    "Expected".into(),
                    "480.00".into(),
                    CreditDebit::Credit,
                    "2026-12-02T03:00:00+00:00".into()
                ),
            ]
        );
        let bad = json!({"balances": [{"balanceAmount": {"currency": "EUR", "amount": "1"}}]});
        assert!(balances(bad.to_string().as_bytes(), "a1", now, &mut dev).is_err());
    }
}
