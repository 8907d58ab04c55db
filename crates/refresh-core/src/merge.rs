//! The transaction refresh rules (SPEC §5) as a pure plan: what to insert, update and delete.
//!
//! The adapter loads the stored rows relevant to a fetched batch (see
//! [`relevant_keys`]), asks [`plan_transaction_merge`] for a [`MergePlan`], and
//! applies it in the refresh's database transaction.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::parse::{echo, string_enum};

/// The most integer digits an amount may have (OBIE allows 13, NextGenPSD2 14).
pub const AMOUNT_MAX_INTEGER_DIGITS: usize = 18;
/// The most fraction digits an amount may have.
pub const AMOUNT_MAX_FRACTION_DIGITS: usize = 5;

/// A decimal amount kept as the bank wrote it: optional `-`, 1 to 18 digits,
/// optionally `.` and 1 to 5 digits. Never a float. Two amounts are equal when
/// their text is (`10.5` and `10.50` differ), so a re-spelled amount counts as a change.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Amount(String);

/// Text that is not a decimal amount.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error(
    "malformed amount {input:?}: expected an optional '-', 1 to {AMOUNT_MAX_INTEGER_DIGITS} digits, and optionally '.' with 1 to {AMOUNT_MAX_FRACTION_DIGITS} digits"
)]
pub struct AmountError {
    /// The rejected text, cut to a bounded length.
    pub input: String,
}

impl Amount {
    /// Validates `s`.
    pub fn parse(s: &str) -> Result<Self, AmountError> {
        if is_decimal(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(AmountError { input: echo(s) })
        }
    }

    /// The amount as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether it starts with `-`.
    pub fn is_negative(&self) -> bool {
        self.0.starts_with('-')
    }
}

fn is_decimal(s: &str) -> bool {
    let unsigned = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = match unsigned.split_once('.') {
        Some((int, frac)) => (int, Some(frac)),
        None => (unsigned, None),
    };
    let digits = |part: &str, max: usize| {
        (1..=max).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_digit())
    };
    digits(int, AMOUNT_MAX_INTEGER_DIGITS)
        && frac.is_none_or(|f| digits(f, AMOUNT_MAX_FRACTION_DIGITS))
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Amount {
    type Err = AmountError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for Amount {
    type Error = AmountError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        if is_decimal(&s) {
            Ok(Self(s))
        } else {
            Err(AmountError { input: echo(&s) })
        }
    }
}

impl From<Amount> for String {
    fn from(amount: Amount) -> Self {
        amount.0
    }
}

string_enum! {
    /// Whether a transaction is booked or still pending.
    pub enum TxStatus as "transaction status" {
        /// Final.
        Booked => "BOOKED",
        /// May still change (and usually becomes booked).
        Pending => "PENDING",
    }
}

string_enum! {
    /// The direction of a transaction.
    pub enum CreditDebit as "credit/debit indicator" {
        /// Money in.
        Credit => "CREDIT",
        /// Money out.
        Debit => "DEBIT",
    }
}

/// A bank transaction, in the domain's terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Transaction {
    /// The bank's account id.
    pub account_id: String,
    /// The bank's transaction id; `None` when the bank gave none (connectors
    /// map an empty id to `None`).
    pub transaction_id: Option<String>,
    /// The booking date, as the bank states it.
    pub booking_date: NaiveDate,
    /// The booking instant.
    pub booking_date_time: DateTime<Utc>,
    /// Booked or pending.
    pub status: TxStatus,
    /// The amount, unsigned or signed as the bank wrote it.
    pub amount: Amount,
    /// ISO 4217 code.
    pub currency: String,
    /// Credit or debit.
    #[serde(rename = "creditDebitIndicator")]
    pub credit_debit: CreditDebit,
    /// Free text.
    pub description: Option<String>,
    /// The bank's object, kept for the API.
    pub raw: serde_json::Value,
}

/// A stored transaction and its database row id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTransaction {
    /// The row's primary key.
    pub row_id: i64,
    /// The stored transaction.
    pub tx: Transaction,
}

/// What a transaction merge changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxSummary {
    /// Rows inserted.
    pub added: u64,
    /// Rows updated in place.
    pub updated: u64,
    /// Rows deleted.
    pub removed: u64,
}

/// The changes to apply, in one database transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergePlan<'a> {
    /// New rows: first the new transactions with an id in batch order, then
    /// the id-less replacements by (account, date), each in batch order.
    pub inserts: Vec<&'a Transaction>,
    /// Rows to overwrite, by row id, with the fetched transaction.
    pub updates: Vec<(i64, &'a Transaction)>,
    /// Rows to delete, by row id.
    pub deletes: Vec<i64>,
    /// The counts for the refresh summary.
    pub summary: TxSummary,
}

impl MergePlan<'_> {
    /// Whether applying the plan changes nothing.
    pub fn is_empty(&self) -> bool {
        self.inserts.is_empty() && self.updates.is_empty() && self.deletes.is_empty()
    }
}

/// Which stored rows [`plan_transaction_merge`] needs for a fetched batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelevantKeys {
    /// (account, transaction id) of every fetched transaction with an id: load
    /// the stored rows with these keys.
    pub ids: BTreeSet<(String, String)>,
    /// (account, booking date) of every fetched transaction without an id:
    /// load the stored id-less rows of these dates.
    pub idless_dates: BTreeSet<(String, NaiveDate)>,
}

/// The keys of the stored rows relevant to `fetched`.
pub fn relevant_keys(fetched: &[Transaction]) -> RelevantKeys {
    let mut keys = RelevantKeys::default();
    for tx in fetched {
        match &tx.transaction_id {
            Some(id) => keys.ids.insert((tx.account_id.clone(), id.clone())),
            None => keys
                .idless_dates
                .insert((tx.account_id.clone(), tx.booking_date)),
        };
    }
    keys
}

type IdKey<'a> = (&'a str, &'a str);
type DateKey<'a> = (&'a str, NaiveDate);

/// Plans the merge of a fetched batch into the stored transactions.
///
/// Contract on `stored`: it holds at least the stored rows selected by
/// [`relevant_keys`]`(fetched)`: the rows whose (account, transaction id) is
/// in the batch, and all id-less rows of each (account, booking date) that
/// has id-less transactions in the batch. Other rows may be passed and are
/// ignored: nothing outside the batch is touched. (Account, transaction id)
/// is unique among stored rows; if not, the first row of a key is the one updated.
///
/// Rules:
/// - With an id, matched on (account, transaction id): unknown → insert;
///   known and different in any field (e.g. pending → booked) → update;
///   known and equal → nothing. Within the batch, the last transaction with
///   a given key wins and is counted once.
/// - Without an id, per (account, booking date) present among the fetched
///   id-less transactions: the stored id-less rows of that date are deleted
///   and the fetched ones inserted, unless both are the same multiset, in
///   which case that date is left alone and counts nothing.
pub fn plan_transaction_merge<'a>(
    stored: &[StoredTransaction],
    fetched: &'a [Transaction],
) -> MergePlan<'a> {
    let mut plan = MergePlan::default();

    // Split the batch; a repeated id keeps its first position and its last value.
    let mut with_id: Vec<(IdKey<'_>, &Transaction)> = Vec::new();
    let mut position: BTreeMap<IdKey<'_>, usize> = BTreeMap::new();
    let mut idless: BTreeMap<DateKey<'_>, Vec<&Transaction>> = BTreeMap::new();
    for tx in fetched {
        match tx.transaction_id.as_deref() {
            Some(id) => {
                let key = (tx.account_id.as_str(), id);
                match position.entry(key) {
                    Entry::Occupied(slot) => with_id[*slot.get()].1 = tx,
                    Entry::Vacant(slot) => {
                        slot.insert(with_id.len());
                        with_id.push((key, tx));
                    }
                }
            }
            None => idless
                .entry((tx.account_id.as_str(), tx.booking_date))
                .or_default()
                .push(tx),
        }
    }

    // Index the stored rows the batch can touch.
    let mut stored_by_id: BTreeMap<IdKey<'_>, &StoredTransaction> = BTreeMap::new();
    let mut stored_idless: BTreeMap<DateKey<'_>, Vec<&StoredTransaction>> = BTreeMap::new();
    for row in stored {
        match row.tx.transaction_id.as_deref() {
            Some(id) => {
                let key = (row.tx.account_id.as_str(), id);
                if position.contains_key(&key) {
                    stored_by_id.entry(key).or_insert(row);
                }
            }
            None => {
                let key = (row.tx.account_id.as_str(), row.tx.booking_date);
                if idless.contains_key(&key) {
                    stored_idless.entry(key).or_default().push(row);
                }
            }
        }
    }

    for (key, tx) in with_id {
        match stored_by_id.get(&key) {
            None => {
                plan.inserts.push(tx);
                plan.summary.added += 1;
            }
            Some(row) if row.tx == *tx => {}
            Some(row) => {
                plan.updates.push((row.row_id, tx));
                plan.summary.updated += 1;
            }
        }
    }

    for (key, fetched_day) in idless {
        let stored_day = stored_idless.remove(&key).unwrap_or_default();
        if same_multiset(&stored_day, &fetched_day) {
            continue;
        }
        for row in stored_day {
            plan.deletes.push(row.row_id);
            plan.summary.removed += 1;
        }
        for tx in fetched_day {
            plan.inserts.push(tx);
            plan.summary.added += 1;
        }
    }

    plan
}

/// The part of the stored transactions a fetch covered: the transactions of the
/// fetched accounts booked from `from` on (the instant the bank was asked from).
/// The default covers nothing (a batch merged on its own).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeWindow {
    /// The window's first instant (00:00 UTC of its first booking date).
    pub from: DateTime<Utc>,
    /// The accounts whose transactions were fetched.
    pub accounts: BTreeSet<String>,
}

impl MergeWindow {
    /// Whether the bank was asked for `tx`: its account was fetched and both its
    /// booking instant and its booking date lie inside the window (a bank may
    /// filter on either).
    pub fn covers(&self, tx: &Transaction) -> bool {
        self.accounts.contains(&tx.account_id)
            && tx.booking_date_time >= self.from
            && tx.booking_date >= self.from.date_naive()
    }
}

/// Plans a refresh's merge: [`plan_transaction_merge`] for the batch, plus
///
/// - a stored row whose (account, transaction id) the bank reports as rejected
///   (`rejected`) is deleted;
/// - a stored `PENDING` row inside `window` that the batch no longer has is
///   deleted (it was booked under another id, or dropped): with an id, when no
///   fetched transaction has its key; without one, when the batch has no id-less
///   transaction of its (account, booking date) (else the same-date rule
///   decides). A `BOOKED` row is never deleted by this rule.
///
/// Each deletion counts once in `removed`. Contract on `stored`: what
/// [`plan_transaction_merge`] needs, the rows with a `rejected` key, and every
/// stored `PENDING` row `window` covers; each row at most once.
pub fn plan_refresh_merge<'a>(
    stored: &[StoredTransaction],
    fetched: &'a [Transaction],
    rejected: &[(String, String)],
    window: &MergeWindow,
) -> MergePlan<'a> {
    let mut plan = plan_transaction_merge(stored, fetched);
    let rejected: BTreeSet<(&str, &str)> = rejected
        .iter()
        .map(|(a, i)| (a.as_str(), i.as_str()))
        .collect();
    let fetched_ids: BTreeSet<(&str, &str)> = fetched
        .iter()
        .filter_map(|t| Some((t.account_id.as_str(), t.transaction_id.as_deref()?)))
        .collect();
    let fetched_idless_dates: BTreeSet<(&str, NaiveDate)> = fetched
        .iter()
        .filter(|t| t.transaction_id.is_none())
        .map(|t| (t.account_id.as_str(), t.booking_date))
        .collect();
    let mut touched: BTreeSet<i64> = plan
        .deletes
        .iter()
        .copied()
        .chain(plan.updates.iter().map(|(row, _)| *row))
        .collect();
    for row in stored {
        let tx = &row.tx;
        let account = tx.account_id.as_str();
        let gone = match tx.transaction_id.as_deref() {
            Some(id) => {
                rejected.contains(&(account, id))
                    || (tx.status == TxStatus::Pending
                        && window.covers(tx)
                        && !fetched_ids.contains(&(account, id)))
            }
            None => {
                tx.status == TxStatus::Pending
                    && window.covers(tx)
                    && !fetched_idless_dates.contains(&(account, tx.booking_date))
            }
        };
        if gone && touched.insert(row.row_id) {
            plan.deletes.push(row.row_id);
            plan.summary.removed += 1;
        }
    }
    plan
}

/// Whether the stored and fetched transactions of one date are equal as
/// multisets. Quadratic, but per (account, day) and only over id-less ones.
fn same_multiset(stored: &[&StoredTransaction], fetched: &[&Transaction]) -> bool {
    if stored.len() != fetched.len() {
        return false;
    }
    let mut used = vec![false; stored.len()];
    fetched.iter().all(|tx| {
        let found = stored
            .iter()
            .zip(used.iter_mut())
            .find(|(row, used)| !**used && row.tx == **tx);
        match found {
            Some((_, used)) => {
                *used = true;
                true
            }
            None => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn amounts() {
        let check = |input: &str, ok: bool| {
            let parsed = Amount::parse(input);
            assert_eq!(parsed.is_ok(), ok, "{input:?}");
            if let Ok(amount) = parsed {
                assert_eq!(amount.to_string(), input);
            }
        };
        check("0", true);
        check("10", true);
        check("10.5", true);
        check("10.50", true);
        check("-3.14159", true);
        check("0.00001", true);
        check("123456789012345678", true);
        check("1234567890123456789", false);
        check("1.123456", false);
        check("", false);
        check("-", false);
        check(".5", false);
        check("5.", false);
        check("+5", false);
        check("--5", false);
        check("1,50", false);
        check("1.5.0", false);
        check(" 1", false);
        check("1e3", false);
        check("NaN", false);
        check("١٢", false);
        assert!(Amount::parse("-1").unwrap().is_negative());
        assert!(!Amount::parse("1").unwrap().is_negative());
        assert_eq!(
            Amount::parse("1,5").unwrap_err().to_string(),
            "malformed amount \"1,5\": expected an optional '-', 1 to 18 digits, and optionally '.' with 1 to 5 digits"
        );
    }

    #[test]
    fn amounts_in_json_are_strings_only() {
        let check = |json: &str, ok: bool| {
            assert_eq!(serde_json::from_str::<Amount>(json).is_ok(), ok, "{json}")
        };
        check(r#""12.30""#, true);
        check(r#""12.3x""#, false);
        check("12.30", false);
        check("12", false);
        assert_eq!(
            serde_json::to_string(&Amount::parse("12.30").unwrap()).unwrap(),
            r#""12.30""#
        );
    }

    /// A transaction of account `acc` on `2024-05-{day}`: `id` "" means none;
    /// `amount` doubles as a label to tell transactions apart.
    fn tx(acc: &str, id: &str, day: u32, status: TxStatus, amount: &str) -> Transaction {
        let booking_date = NaiveDate::from_ymd_opt(2024, 5, day).unwrap();
        Transaction {
            account_id: acc.to_owned(),
            transaction_id: (!id.is_empty()).then(|| id.to_owned()),
            booking_date,
            booking_date_time: booking_date.and_hms_opt(12, 0, 0).unwrap().and_utc(),
            status,
            amount: Amount::parse(amount).unwrap(),
            currency: "GBP".to_owned(),
            credit_debit: CreditDebit::Debit,
            description: Some(format!("{acc}/{id}/{amount}")),
            raw: json!({"Amount": {"Amount": amount, "Currency": "GBP"}}),
        }
    }

    fn booked(acc: &str, id: &str, day: u32, amount: &str) -> Transaction {
        tx(acc, id, day, TxStatus::Booked, amount)
    }

    fn pending(acc: &str, id: &str, day: u32, amount: &str) -> Transaction {
        tx(acc, id, day, TxStatus::Pending, amount)
    }

    fn rows(txs: &[(i64, Transaction)]) -> Vec<StoredTransaction> {
        txs.iter()
            .map(|(row_id, tx)| StoredTransaction {
                row_id: *row_id,
                tx: tx.clone(),
            })
            .collect()
    }

    /// Expected plan, by labels: inserted amounts, (row id, amount) updates, deleted row ids, counts.
    struct Want<'a> {
        inserts: &'a [&'a str],
        updates: &'a [(i64, &'a str)],
        deletes: &'a [i64],
        summary: (u64, u64, u64),
    }

    fn check(stored: &[(i64, Transaction)], fetched: &[Transaction], want: Want<'_>) {
        let plan = plan_transaction_merge(&rows(stored), fetched);
        let inserts: Vec<&str> = plan.inserts.iter().map(|t| t.amount.as_str()).collect();
        let updates: Vec<(i64, &str)> = plan
            .updates
            .iter()
            .map(|(r, t)| (*r, t.amount.as_str()))
            .collect();
        assert_eq!(inserts, want.inserts, "inserts");
        assert_eq!(updates, want.updates, "updates");
        assert_eq!(plan.deletes, want.deletes, "deletes");
        let s = plan.summary;
        assert_eq!(
            (s.added, s.updated, s.removed),
            want.summary,
            "summary (added, updated, removed)"
        );
        assert_eq!(plan.is_empty(), want.summary == (0, 0, 0));
    }

    #[test]
    fn with_ids() {
        // New.
        check(
            &[],
            &[booked("a", "t1", 1, "1")],
            Want {
                inserts: &["1"],
                updates: &[],
                deletes: &[],
                summary: (1, 0, 0),
            },
        );
        // Pending → booked.
        check(
            &[(7, pending("a", "t1", 1, "1"))],
            &[booked("a", "t1", 1, "1")],
            Want {
                inserts: &[],
                updates: &[(7, "1")],
                deletes: &[],
                summary: (0, 1, 0),
            },
        );
        // Amount corrected.
        check(
            &[(7, booked("a", "t1", 1, "1"))],
            &[booked("a", "t1", 1, "1.5")],
            Want {
                inserts: &[],
                updates: &[(7, "1.5")],
                deletes: &[],
                summary: (0, 1, 0),
            },
        );
        // Unchanged.
        check(
            &[(7, booked("a", "t1", 1, "1"))],
            &[booked("a", "t1", 1, "1")],
            Want {
                inserts: &[],
                updates: &[],
                deletes: &[],
                summary: (0, 0, 0),
            },
        );
        // The same id at another account is another transaction.
        check(
            &[(7, booked("a", "t1", 1, "1"))],
            &[booked("b", "t1", 1, "2")],
            Want {
                inserts: &["2"],
                updates: &[],
                deletes: &[],
                summary: (1, 0, 0),
            },
        );
        // Stored rows not in the batch are never touched.
        check(
            &[
                (7, booked("a", "t1", 1, "1")),
                (8, booked("a", "t2", 1, "2")),
            ],
            &[booked("a", "t3", 1, "3")],
            Want {
                inserts: &["3"],
                updates: &[],
                deletes: &[],
                summary: (1, 0, 0),
            },
        );
        // Duplicates in the batch: the last wins, counted once.
        check(
            &[],
            &[
                pending("a", "t1", 1, "1"),
                booked("a", "t2", 1, "2"),
                booked("a", "t1", 1, "1.1"),
            ],
            Want {
                inserts: &["1.1", "2"],
                updates: &[],
                deletes: &[],
                summary: (2, 0, 0),
            },
        );
        check(
            &[(7, pending("a", "t1", 1, "1"))],
            &[booked("a", "t1", 1, "1"), booked("a", "t1", 1, "1.2")],
            Want {
                inserts: &[],
                updates: &[(7, "1.2")],
                deletes: &[],
                summary: (0, 1, 0),
            },
        );
        check(
            &[(7, booked("a", "t1", 1, "1"))],
            &[booked("a", "t1", 1, "9"), booked("a", "t1", 1, "1")],
            Want {
                inserts: &[],
                updates: &[],
                deletes: &[],
                summary: (0, 0, 0),
            },
        );
    }

    #[test]
    fn without_ids() {
        // Same-date replacement.
        check(
            &[(1, booked("a", "", 2, "10")), (2, booked("a", "", 2, "20"))],
            &[booked("a", "", 2, "10"), booked("a", "", 2, "30")],
            Want {
                inserts: &["10", "30"],
                updates: &[],
                deletes: &[1, 2],
                summary: (2, 0, 2),
            },
        );
        // A pending id-less transaction that got booked.
        check(
            &[(1, pending("a", "", 2, "10"))],
            &[booked("a", "", 2, "10")],
            Want {
                inserts: &["10"],
                updates: &[],
                deletes: &[1],
                summary: (1, 0, 1),
            },
        );
        // First id-less transactions of a date.
        check(
            &[],
            &[booked("a", "", 2, "10")],
            Want {
                inserts: &["10"],
                updates: &[],
                deletes: &[],
                summary: (1, 0, 0),
            },
        );
        // Other dates and other accounts are left as stored, even if passed in.
        check(
            &[
                (1, booked("a", "", 1, "10")),
                (2, booked("a", "", 2, "20")),
                (3, booked("b", "", 2, "30")),
            ],
            &[booked("a", "", 2, "21")],
            Want {
                inserts: &["21"],
                updates: &[],
                deletes: &[2],
                summary: (1, 0, 1),
            },
        );
        // An equal set is a no-op, whatever the order.
        check(
            &[(1, booked("a", "", 2, "10")), (2, booked("a", "", 2, "20"))],
            &[booked("a", "", 2, "20"), booked("a", "", 2, "10")],
            Want {
                inserts: &[],
                updates: &[],
                deletes: &[],
                summary: (0, 0, 0),
            },
        );
        // Equal as a multiset: repeated identical transactions count by multiplicity.
        check(
            &[(1, booked("a", "", 2, "10")), (2, booked("a", "", 2, "10"))],
            &[booked("a", "", 2, "10"), booked("a", "", 2, "10")],
            Want {
                inserts: &[],
                updates: &[],
                deletes: &[],
                summary: (0, 0, 0),
            },
        );
        check(
            &[(1, booked("a", "", 2, "10")), (2, booked("a", "", 2, "20"))],
            &[booked("a", "", 2, "10"), booked("a", "", 2, "10")],
            Want {
                inserts: &["10", "10"],
                updates: &[],
                deletes: &[1, 2],
                summary: (2, 0, 2),
            },
        );
        check(
            &[(1, booked("a", "", 2, "10")), (2, booked("a", "", 2, "10"))],
            &[booked("a", "", 2, "10")],
            Want {
                inserts: &["10"],
                updates: &[],
                deletes: &[1, 2],
                summary: (1, 0, 2),
            },
        );
        // One date unchanged, another replaced.
        check(
            &[(1, booked("a", "", 2, "10")), (2, booked("a", "", 3, "20"))],
            &[booked("a", "", 2, "10"), booked("a", "", 3, "21")],
            Want {
                inserts: &["21"],
                updates: &[],
                deletes: &[2],
                summary: (1, 0, 1),
            },
        );
        // A stored row with an id on that date is not an id-less row.
        check(
            &[(1, booked("a", "t1", 2, "10"))],
            &[booked("a", "", 2, "10")],
            Want {
                inserts: &["10"],
                updates: &[],
                deletes: &[],
                summary: (1, 0, 0),
            },
        );
    }

    #[test]
    fn mixed() {
        check(
            &[
                (1, pending("a", "t1", 1, "1")),
                (2, booked("a", "t2", 1, "2")),
                (3, booked("a", "", 1, "3")),
                (4, booked("a", "", 2, "4")),
                (5, booked("a", "", 3, "5")),
                (6, booked("b", "t1", 1, "6")),
            ],
            &[
                booked("a", "t1", 1, "1"),
                booked("a", "t2", 1, "2"),
                booked("a", "t3", 2, "7"),
                booked("a", "", 1, "3"),
                booked("a", "", 2, "8"),
                booked("a", "", 2, "9"),
                booked("b", "", 4, "11"),
                booked("a", "t3", 2, "7.5"),
            ],
            Want {
                inserts: &["7.5", "8", "9", "11"],
                updates: &[(1, "1")],
                deletes: &[4],
                summary: (4, 1, 1),
            },
        );
    }

    /// [`plan_refresh_merge`] with the window from 2024-05-03 over account `a`.
    fn check_refresh(
        stored: &[(i64, Transaction)],
        fetched: &[Transaction],
        rejected: &[(&str, &str)],
        want: Want<'_>,
    ) {
        let window = MergeWindow {
            from: NaiveDate::from_ymd_opt(2024, 5, 3)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap()
                .and_utc(),
            accounts: BTreeSet::from(["a".to_owned()]),
        };
        let rejected: Vec<(String, String)> = rejected
            .iter()
            .map(|(a, i)| ((*a).to_owned(), (*i).to_owned()))
            .collect();
        let plan = plan_refresh_merge(&rows(stored), fetched, &rejected, &window);
        let inserts: Vec<&str> = plan.inserts.iter().map(|t| t.amount.as_str()).collect();
        let updates: Vec<(i64, &str)> = plan
            .updates
            .iter()
            .map(|(r, t)| (*r, t.amount.as_str()))
            .collect();
        assert_eq!(inserts, want.inserts, "inserts");
        assert_eq!(updates, want.updates, "updates");
        assert_eq!(plan.deletes, want.deletes, "deletes");
        let s = plan.summary;
        assert_eq!((s.added, s.updated, s.removed), want.summary, "summary");
    }

    const NOTHING: Want<'static> = Want {
        inserts: &[],
        updates: &[],
        deletes: &[],
        summary: (0, 0, 0),
    };

    #[test]
    fn pending_rows_the_bank_no_longer_returns_go() {
        const REMOVED: Want<'static> = Want {
            inserts: &[],
            updates: &[],
            deletes: &[1],
            summary: (0, 0, 1),
        };
        // Inside the window, with or without an id.
        check_refresh(&[(1, pending("a", "t1", 4, "1"))], &[], &[], REMOVED);
        check_refresh(&[(1, pending("a", "", 4, "1"))], &[], &[], REMOVED);
        // On the window's first day.
        check_refresh(&[(1, pending("a", "t1", 3, "1"))], &[], &[], REMOVED);
        // Booked ones stay; so do pending ones before the window or of another account.
        check_refresh(&[(1, booked("a", "t1", 4, "1"))], &[], &[], NOTHING);
        check_refresh(&[(1, booked("a", "", 4, "1"))], &[], &[], NOTHING);
        check_refresh(&[(1, pending("a", "t1", 2, "1"))], &[], &[], NOTHING);
        check_refresh(&[(1, pending("b", "t1", 4, "1"))], &[], &[], NOTHING);
        // Still pending at the bank.
        check_refresh(
            &[(1, pending("a", "t1", 4, "1"))],
            &[pending("a", "t1", 4, "1")],
            &[],
            NOTHING,
        );
        check_refresh(
            &[(1, pending("a", "", 4, "1"))],
            &[pending("a", "", 4, "1")],
            &[],
            NOTHING,
        );
        // The same id at another account does not keep it.
        check_refresh(
            &[(1, pending("a", "t1", 4, "1"))],
            &[pending("b", "t1", 4, "1")],
            &[],
            Want {
                inserts: &["1"],
                updates: &[],
                deletes: &[1],
                summary: (1, 0, 1),
            },
        );
    }

    #[test]
    fn pending_rows_that_book() {
        // By id, on another date and with a new amount: updated, not removed.
        check_refresh(
            &[(1, pending("a", "t1", 4, "1"))],
            &[booked("a", "t1", 6, "1.5")],
            &[],
            Want {
                inserts: &[],
                updates: &[(1, "1.5")],
                deletes: &[],
                summary: (0, 1, 0),
            },
        );
        // Id-less, booked under an id on another date: one transaction is left.
        check_refresh(
            &[(1, pending("a", "", 5, "1"))],
            &[booked("a", "x1", 4, "1")],
            &[],
            Want {
                inserts: &["1"],
                updates: &[],
                deletes: &[1],
                summary: (1, 0, 1),
            },
        );
        // Id-less on the same date: the same-date rule replaces it, counted once.
        check_refresh(
            &[(1, pending("a", "", 5, "1")), (2, booked("a", "", 6, "2"))],
            &[booked("a", "", 5, "1")],
            &[],
            Want {
                inserts: &["1"],
                updates: &[],
                deletes: &[1],
                summary: (1, 0, 1),
            },
        );
    }

    #[test]
    fn rejected_rows_go_once() {
        // Before the window too, and counted once when also pending inside it.
        check_refresh(
            &[(1, pending("a", "t9", 1, "9"))],
            &[],
            &[("a", "t9")],
            Want {
                inserts: &[],
                updates: &[],
                deletes: &[1],
                summary: (0, 0, 1),
            },
        );
        check_refresh(
            &[
                (1, pending("a", "t9", 4, "9")),
                (2, pending("a", "t8", 4, "8")),
            ],
            &[pending("a", "t8", 4, "8")],
            &[("a", "t9"), ("b", "t8")],
            Want {
                inserts: &[],
                updates: &[],
                deletes: &[1],
                summary: (0, 0, 1),
            },
        );
    }

    #[test]
    fn relevant_keys_select_what_the_plan_reads() {
        let fetched = [
            booked("a", "t1", 1, "1"),
            booked("a", "t1", 1, "1"),
            booked("b", "t1", 1, "2"),
            booked("a", "", 1, "3"),
            booked("a", "", 1, "4"),
            booked("a", "", 2, "5"),
        ];
        let keys = relevant_keys(&fetched);
        let ids: Vec<(&str, &str)> = keys
            .ids
            .iter()
            .map(|(a, t)| (a.as_str(), t.as_str()))
            .collect();
        let dates: Vec<(&str, String)> = keys
            .idless_dates
            .iter()
            .map(|(a, d)| (a.as_str(), d.to_string()))
            .collect();
        assert_eq!(ids, [("a", "t1"), ("b", "t1")]);
        assert_eq!(
            dates,
            [
                ("a", "2024-05-01".to_owned()),
                ("a", "2024-05-02".to_owned())
            ]
        );
        assert_eq!(relevant_keys(&[]), RelevantKeys::default());
    }

    #[test]
    fn transaction_json() {
        let t = booked("acc-1", "", 2, "12.30");
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(
            json,
            json!({
                "accountId": "acc-1",
                "transactionId": null,
                "bookingDate": "2024-05-02",
                "bookingDateTime": "2024-05-02T12:00:00Z",
                "status": "BOOKED",
                "amount": "12.30",
                "currency": "GBP",
                "creditDebitIndicator": "DEBIT",
                "description": "acc-1//12.30",
                "raw": {"Amount": {"Amount": "12.30", "Currency": "GBP"}},
            })
        );
        assert_eq!(serde_json::from_value::<Transaction>(json).unwrap(), t);
    }

    /// Properties of the merge rules on random stored sets and batches: merging the
    /// same batch twice changes nothing, and the stored set after a merge is what a
    /// plain model of SPEC §5 says.
    mod properties {
        use proptest::prelude::*;

        use super::*;

        fn transaction() -> impl Strategy<Value = Transaction> {
            (
                0_usize..2,
                prop::option::weighted(0.6, 0_u8..6),
                0_u32..5,
                0_u32..24,
                any::<bool>(),
                prop::sample::select(vec!["1.00", "2.50", "10", "-3.14"]),
                prop::option::of(prop::sample::select(vec!["coffee", "rent"])),
            )
                .prop_map(|(account, id, day, hour, booked, amount, description)| {
                    let booking_date =
                        NaiveDate::from_ymd_opt(2026, 11, 20 + day).expect("a valid date");
                    Transaction {
                        account_id: format!("acc{account}"),
                        transaction_id: id.map(|i| format!("t{i}")),
                        booking_date,
                        booking_date_time: booking_date
                            .and_hms_opt(hour, 0, 0)
                            .expect("a valid time")
                            .and_utc(),
                        status: if booked {
                            TxStatus::Booked
                        } else {
                            TxStatus::Pending
                        },
                        amount: Amount::parse(amount).expect("a valid amount"),
                        currency: "GBP".to_owned(),
                        credit_debit: CreditDebit::Debit,
                        description: description.map(str::to_owned),
                        raw: serde_json::Value::Null,
                    }
                })
        }

        /// Stored rows, unique by (account, transaction id) as the database keeps them.
        fn stored() -> impl Strategy<Value = Vec<StoredTransaction>> {
            prop::collection::vec(transaction(), 0..14).prop_map(|txs| {
                let mut keys = BTreeSet::new();
                txs.into_iter()
                    .filter(|t| match &t.transaction_id {
                        Some(id) => keys.insert((t.account_id.clone(), id.clone())),
                        None => true,
                    })
                    .zip(1_i64..)
                    .map(|(tx, row_id)| StoredTransaction { row_id, tx })
                    .collect()
            })
        }

        fn window() -> impl Strategy<Value = MergeWindow> {
            (0_u32..6, any::<bool>(), any::<bool>()).prop_map(|(day, a0, a1)| MergeWindow {
                from: NaiveDate::from_ymd_opt(2026, 11, 20 + day)
                    .expect("a valid date")
                    .and_hms_opt(0, 0, 0)
                    .expect("midnight")
                    .and_utc(),
                accounts: [(a0, "acc0"), (a1, "acc1")]
                    .into_iter()
                    .filter(|(on, _)| *on)
                    .map(|(_, a)| a.to_owned())
                    .collect(),
            })
        }

        /// The rows after applying `plan`; new rows get ids after `next_id`.
        fn apply(stored: &[StoredTransaction], plan: &MergePlan<'_>) -> Vec<StoredTransaction> {
            let deleted: BTreeSet<i64> = plan.deletes.iter().copied().collect();
            let updated: BTreeMap<i64, &Transaction> = plan.updates.iter().copied().collect();
            let next_id = stored.iter().map(|r| r.row_id).max().unwrap_or(0) + 1;
            stored
                .iter()
                .filter(|r| !deleted.contains(&r.row_id))
                .map(|r| StoredTransaction {
                    row_id: r.row_id,
                    tx: updated
                        .get(&r.row_id)
                        .map_or_else(|| r.tx.clone(), |t| (*t).clone()),
                })
                .chain(
                    plan.inserts
                        .iter()
                        .zip(next_id..)
                        .map(|(t, row_id)| StoredTransaction {
                            row_id,
                            tx: (*t).clone(),
                        }),
                )
                .collect()
        }

        /// SPEC §5 stated plainly, without plans: the stored set after a refresh.
        fn model(
            stored: &[StoredTransaction],
            fetched: &[Transaction],
            rejected: &[(String, String)],
            window: &MergeWindow,
        ) -> Vec<Transaction> {
            let key = |t: &Transaction| (t.account_id.clone(), t.transaction_id.clone());
            let fetched_ids: BTreeSet<_> = fetched
                .iter()
                .filter(|t| t.transaction_id.is_some())
                .map(key)
                .collect();
            let fetched_dates: BTreeSet<_> = fetched
                .iter()
                .filter(|t| t.transaction_id.is_none())
                .map(|t| (t.account_id.clone(), t.booking_date))
                .collect();
            let rejected: BTreeSet<_> = rejected
                .iter()
                .map(|(a, i)| (a.clone(), Some(i.clone())))
                .collect();
            let mut out: Vec<Transaction> = stored
                .iter()
                .map(|r| &r.tx)
                .filter(|t| match &t.transaction_id {
                    // Replaced by the batch, rejected, or a pending one the bank dropped.
                    Some(_) => {
                        let dropped = t.status == TxStatus::Pending && window.covers(t);
                        !(fetched_ids.contains(&key(t)) || rejected.contains(&key(t)) || dropped)
                    }
                    // Its date replaced by the batch, or a pending one dropped.
                    None => {
                        let dropped = t.status == TxStatus::Pending && window.covers(t);
                        !(fetched_dates.contains(&(t.account_id.clone(), t.booking_date))
                            || dropped)
                    }
                })
                .cloned()
                .collect();
            // With an id, the last of a key in the batch wins.
            let mut last: BTreeMap<_, &Transaction> = BTreeMap::new();
            for t in fetched.iter().filter(|t| t.transaction_id.is_some()) {
                last.insert(key(t), t);
            }
            out.extend(last.into_values().cloned());
            out.extend(
                fetched
                    .iter()
                    .filter(|t| t.transaction_id.is_none())
                    .cloned(),
            );
            out
        }

        fn sorted(mut txs: Vec<Transaction>) -> Vec<String> {
            let mut out: Vec<String> = txs.drain(..).map(|t| format!("{t:?}")).collect();
            out.sort();
            out
        }

        /// Stored rows, a batch, the keys the bank reports rejected, the window.
        type Case = (
            Vec<StoredTransaction>,
            Vec<Transaction>,
            Vec<(String, String)>,
            MergeWindow,
        );

        fn case() -> impl Strategy<Value = Case> {
            (
                stored(),
                prop::collection::vec(transaction(), 0..12),
                prop::collection::vec((0_usize..2, 0_u8..6), 0..3),
                window(),
            )
                .prop_map(|(stored, fetched, rejected, window)| {
                    // A bank does not both return and reject one transaction.
                    let returned: BTreeSet<(String, String)> = fetched
                        .iter()
                        .filter_map(|t| Some((t.account_id.clone(), t.transaction_id.clone()?)))
                        .collect();
                    let rejected = rejected
                        .into_iter()
                        .map(|(a, i)| (format!("acc{a}"), format!("t{i}")))
                        .filter(|k| !returned.contains(k))
                        .collect();
                    (stored, fetched, rejected, window)
                })
        }

        proptest! {
            /// The stored set after a merge equals the model's, and the summary
            /// counts exactly the rows the plan touches.
            #[test]
            fn a_merge_stores_what_the_model_says((stored, fetched, rejected, window) in case()) {
                let plan = plan_refresh_merge(&stored, &fetched, &rejected, &window);
                prop_assert_eq!(plan.summary.added, plan.inserts.len() as u64);
                prop_assert_eq!(plan.summary.updated, plan.updates.len() as u64);
                prop_assert_eq!(plan.summary.removed, plan.deletes.len() as u64);
                let after = apply(&stored, &plan);
                prop_assert_eq!(
                    sorted(after.into_iter().map(|r| r.tx).collect()),
                    sorted(model(&stored, &fetched, &rejected, &window))
                );
            }

            /// Merging the same batch again changes nothing and counts nothing.
            #[test]
            fn merging_the_same_batch_twice_changes_nothing(
                (stored, fetched, rejected, window) in case()
            ) {
                let once = apply(&stored, &plan_refresh_merge(&stored, &fetched, &rejected, &window));
                let twice = plan_refresh_merge(&once, &fetched, &rejected, &window);
                prop_assert!(twice.is_empty(), "{:?}", twice);
                prop_assert_eq!(twice.summary, TxSummary::default());
                let plain = plan_transaction_merge(&once, &fetched);
                prop_assert!(plain.is_empty(), "{:?}", plain);
            }
        }
    }
}
