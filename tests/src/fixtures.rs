//! Hand-made simulator datasets (one account `A1`, transactions relative to today)
//! for tests that need to know exactly what the bank answers.

use chrono::{TimeDelta, Utc};
use serde_json::{Value, json};

/// 10:00 UTC `days_ago` days ago, as the bank writes a date-time.
pub fn day(days_ago: i64) -> String {
    (Utc::now() - TimeDelta::days(days_ago))
        .format("%Y-%m-%dT10:00:00+00:00")
        .to_string()
}

/// A GBP debit of account `A1` with `status`, booked `days_ago` days ago, with an
/// id when given.
pub fn tx(id: Option<&str>, status: &str, days_ago: i64, amount: &str) -> Value {
    let mut tx = json!({
        "AccountId": "A1", "Amount": {"Amount": amount, "Currency": "GBP"},
        "CreditDebitIndicator": "Debit", "Status": status,
        "BookingDateTime": day(days_ago), "TransactionInformation": format!("shop {amount}")
    });
    if let Some(id) = id {
        tx["TransactionId"] = json!(id);
    }
    tx
}

/// Account `A1` held by `holder`, its balance, `transactions` (a refresh is three
/// bank calls) and one beneficiary (read only by an initial load).
pub fn dataset(holder: &str, nickname: &str, balance: &str, transactions: Vec<Value>) -> Value {
    json!({
        "accounts": [{
            "AccountId": "A1", "Status": "Enabled", "Currency": "GBP", "AccountType": "Personal",
            "AccountSubType": "CurrentAccount", "Nickname": nickname,
            "Account": [{"SchemeName": "UK.OBIE.SortCodeAccountNumber", "Identification": "80200110203345", "Name": holder}]
        }],
        "balances": [{
            "AccountId": "A1", "Amount": {"Amount": balance, "Currency": "GBP"},
            "CreditDebitIndicator": "Credit", "Type": "InterimAvailable", "DateTime": day(0)
        }],
        "transactions": transactions,
        "beneficiaries": [{"AccountId": "A1", "BeneficiaryId": "B1", "Reference": "rent"}]
    })
}
