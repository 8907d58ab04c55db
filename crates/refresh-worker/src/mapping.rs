//! From what a connector fetched ([`BankData`]) to what the store writes
//! ([`FetchedData`]): bank types become domain types, party data is split off.

use refresh_bank::{BankData, BankItem, TransactionStatus};
use refresh_core::{CreditDebit, FetchScope, MergeWindow, Transaction, TxStatus};
use refresh_pg::{AccountData, AccountDetails, BalanceData, FetchedData, ItemData};
use serde_json::Value;

/// The key of an OBIE account's party data: `Account[]`, the holders' scheme
/// names, identifications and names. Kept from the initial connection only.
const PARTY_KEY: &str = "Account";

/// The fetch could not become stored data without storing something wrong.
#[derive(Debug, thiserror::Error)]
#[error("bank data cannot be stored: {0}")]
pub(crate) struct MappingError(String);

/// What the mapping dropped, for the logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dropped {
    /// Rejected transactions without an id: nothing stored can match them.
    pub(crate) rejected_without_id: u64,
}

fn credit_debit(cd: refresh_bank::CreditDebit) -> CreditDebit {
    match cd {
        refresh_bank::CreditDebit::Credit => CreditDebit::Credit,
        refresh_bank::CreditDebit::Debit => CreditDebit::Debit,
    }
}

/// Splits an account object into (data without party data, party data).
fn split_parties(raw: &Value) -> (Value, Option<Value>) {
    match raw {
        Value::Object(map) => {
            let mut data = map.clone();
            let parties = data
                .remove(PARTY_KEY)
                .map(|p| serde_json::json!({ PARTY_KEY: p }));
            (Value::Object(data), parties)
        }
        other => (other.clone(), None),
    }
}

fn items(kind: &'static str, list: &[BankItem], out: &mut Vec<ItemData>) {
    out.extend(list.iter().map(|item| ItemData {
        kind,
        account_id: (!item.account_id.is_empty()).then(|| item.account_id.clone()),
        data: item.raw.clone(),
    }));
}

/// Maps a fetch of `scope`. An initial load keeps party data and the other kinds; a
/// plain refresh drops them (they are kept from the initial connection). The merge
/// window is the fetched accounts' transactions from the scope's first instant on.
///
/// Rejected transactions are not stored: one with an id removes a stored row with
/// that id (a pending transaction the bank rejected); one without an id is dropped
/// and counted.
pub(crate) fn map_fetch(
    data: BankData,
    scope: &FetchScope,
) -> Result<(FetchedData, Dropped), MappingError> {
    let initial = scope.initial;
    let mut dropped = Dropped::default();
    let window = MergeWindow {
        from: scope.from_instant(),
        accounts: data.accounts.iter().map(|a| a.account_id.clone()).collect(),
    };
    let accounts = data
        .accounts
        .iter()
        .map(|account| {
            let (stripped, parties) = split_parties(&account.raw);
            AccountData {
                account_id: account.account_id.clone(),
                details: AccountDetails {
                    status: account.status.clone(),
                    currency: account.currency.clone(),
                    account_type: account.account_type.clone(),
                    account_sub_type: account.account_sub_type.clone(),
                    nickname: account.nickname.clone(),
                    description: account.description.clone(),
                    opening_date: account.opening_date.map(|t| t.to_utc()),
                },
                data: stripped,
                parties: if initial { parties } else { None },
            }
        })
        .collect();
    let balances = data
        .balances
        .iter()
        .map(|b| BalanceData {
            account_id: b.account_id.clone(),
            balance_type: b.balance_type.clone(),
            credit_debit: credit_debit(b.credit_debit),
            amount: b.amount.clone(),
            currency: b.currency.clone(),
            date_time: b.date_time.to_utc(),
            data: b.raw.clone(),
        })
        .collect();
    let mut transactions = Vec::with_capacity(data.transactions.len());
    let mut rejected = Vec::new();
    for tx in data.transactions {
        let status = match tx.status {
            TransactionStatus::Booked => TxStatus::Booked,
            TransactionStatus::Pending => TxStatus::Pending,
            TransactionStatus::Rejected => {
                match &tx.transaction_id {
                    Some(id) => rejected.push((tx.account_id.clone(), id.clone())),
                    None => dropped.rejected_without_id += 1,
                }
                continue;
            }
        };
        transactions.push(Transaction {
            account_id: tx.account_id,
            transaction_id: tx.transaction_id,
            booking_date: tx.booking_date,
            booking_date_time: tx.booking_date_time.to_utc(),
            status,
            amount: tx.amount,
            currency: tx.currency,
            credit_debit: credit_debit(tx.credit_debit),
            description: tx.description,
            raw: tx.raw,
        });
    }
    let items_out = match (&data.initial, initial) {
        (Some(more), true) => {
            let mut out = Vec::new();
            items("parties", &more.parties, &mut out);
            items("beneficiaries", &more.beneficiaries, &mut out);
            items("direct_debits", &more.direct_debits, &mut out);
            items("standing_orders", &more.standing_orders, &mut out);
            items("scheduled_payments", &more.scheduled_payments, &mut out);
            items("statements", &more.statements, &mut out);
            items("products", &more.products, &mut out);
            Some(out)
        }
        (None, true) => Some(Vec::new()),
        _ => None,
    };
    Ok((
        FetchedData {
            initial,
            window,
            accounts,
            balances,
            transactions,
            rejected,
            items: items_out,
        },
        dropped,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn party_data_is_split_off_the_account() {
        let raw = json!({"AccountId": "a1", "Currency": "GBP",
            "Account": [{"SchemeName": "UK.OBIE.SortCodeAccountNumber", "Identification": "1", "Name": "Ms A"}]});
        let (data, parties) = split_parties(&raw);
        assert_eq!(data, json!({"AccountId": "a1", "Currency": "GBP"}));
        assert_eq!(
            parties,
            Some(
                json!({"Account": [{"SchemeName": "UK.OBIE.SortCodeAccountNumber", "Identification": "1", "Name": "Ms A"}]})
            )
        );
        assert_eq!(split_parties(&json!({"AccountId": "a"})).1, None);
    }
}
