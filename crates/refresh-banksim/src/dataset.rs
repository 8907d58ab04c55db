//! A consent's data: the control API's JSON shape (`GET`/`PUT
//! /sim/consents/{id}`), and the per-account index the OBIE endpoints read.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One item, in its OBIE shape plus its `AccountId` (parties carry one here,
/// which the `/parties` endpoint leaves out).
pub(crate) type Item = Map<String, Value>;

/// The whole dataset as the control API reads and writes it. Items are not
/// checked beyond having a string `AccountId`: a test may store what a
/// misbehaving bank would send.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct DatasetWire {
    #[serde(default)]
    pub(crate) accounts: Vec<Item>,
    #[serde(default)]
    pub(crate) balances: Vec<Item>,
    #[serde(default)]
    pub(crate) transactions: Vec<Item>,
    #[serde(default)]
    pub(crate) parties: Vec<Item>,
    #[serde(default)]
    pub(crate) beneficiaries: Vec<Item>,
    #[serde(default)]
    pub(crate) direct_debits: Vec<Item>,
    #[serde(default)]
    pub(crate) standing_orders: Vec<Item>,
    #[serde(default)]
    pub(crate) scheduled_payments: Vec<Item>,
    #[serde(default)]
    pub(crate) statements: Vec<Item>,
    #[serde(default)]
    pub(crate) products: Vec<Item>,
}

/// The per-account listings, by the path segment that serves them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Balances,
    Transactions,
    Parties,
    Beneficiaries,
    DirectDebits,
    StandingOrders,
    ScheduledPayments,
    Statements,
    Products,
}

impl DatasetWire {
    /// Every list with its control-API name, in a fixed order ([`Kind::slot`]).
    fn lists(&self) -> [(&'static str, &Vec<Item>); 10] {
        [
            ("accounts", &self.accounts),
            ("balances", &self.balances),
            ("transactions", &self.transactions),
            ("parties", &self.parties),
            ("beneficiaries", &self.beneficiaries),
            ("directDebits", &self.direct_debits),
            ("standingOrders", &self.standing_orders),
            ("scheduledPayments", &self.scheduled_payments),
            ("statements", &self.statements),
            ("products", &self.products),
        ]
    }
}

impl DatasetWire {
    pub(crate) fn list(&self, kind: Kind) -> &[Item] {
        self.lists()[kind.slot()].1
    }
}

const ACCOUNTS: usize = 0;

impl Kind {
    /// This kind's place in [`DatasetWire::lists`].
    fn slot(self) -> usize {
        match self {
            Self::Balances => 1,
            Self::Transactions => 2,
            Self::Parties => 3,
            Self::Beneficiaries => 4,
            Self::DirectDebits => 5,
            Self::StandingOrders => 6,
            Self::ScheduledPayments => 7,
            Self::Statements => 8,
            Self::Products => 9,
        }
    }
}

/// An item and its JSON as served (for parties, without `AccountId`: the
/// OBIE party has none).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Served<'a> {
    pub(crate) item: &'a Item,
    pub(crate) json: &'a str,
}

/// A dataset ready to serve. Each item is serialised once, here, so a page is
/// put together by concatenation.
#[derive(Debug)]
pub(crate) struct Dataset {
    pub(crate) wire: DatasetWire,
    /// Per list (in [`DatasetWire::lists`] order), each item's JSON.
    json: Vec<Vec<String>>,
    /// Transactions per account, in dataset order, with their booking time in
    /// UTC (`None` when unreadable: such a transaction passes every filter).
    transactions: HashMap<String, Vec<(Option<NaiveDateTime>, usize)>>,
}

fn account_id(item: &Item) -> Option<&str> {
    item.get("AccountId").and_then(Value::as_str)
}

fn to_json(item: &Item) -> String {
    // Serialising a map of JSON values cannot fail.
    serde_json::to_string(item).unwrap_or_else(|_| "{}".to_owned())
}

impl Dataset {
    /// Checks that every item names its account, and indexes the transactions.
    pub(crate) fn new(wire: DatasetWire) -> Result<Self, String> {
        for (list, items) in wire.lists() {
            for (i, item) in items.iter().enumerate() {
                if account_id(item).is_none() {
                    return Err(format!("{list}[{i}]: AccountId must be a string"));
                }
            }
        }
        let json = wire
            .lists()
            .iter()
            .enumerate()
            .map(|(slot, (_, items))| {
                items
                    .iter()
                    .map(|item| {
                        if slot == Kind::Parties.slot() {
                            let mut party = item.clone();
                            party.remove("AccountId");
                            to_json(&party)
                        } else {
                            to_json(item)
                        }
                    })
                    .collect()
            })
            .collect();
        let mut transactions: HashMap<String, Vec<_>> = HashMap::new();
        for (i, t) in wire.transactions.iter().enumerate() {
            let booked = t
                .get("BookingDateTime")
                .and_then(Value::as_str)
                .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                .map(|t| t.with_timezone(&Utc).naive_utc());
            let account = account_id(t).unwrap_or_default().to_owned();
            transactions.entry(account).or_default().push((booked, i));
        }
        Ok(Self {
            wire,
            json,
            transactions,
        })
    }

    /// A generated dataset. Every generated item has its `AccountId`, so
    /// `new` cannot refuse it; were it to, the consent would get no data.
    pub(crate) fn generated(wire: DatasetWire) -> Self {
        Self::new(wire).unwrap_or_else(|_| Self {
            wire: DatasetWire::default(),
            json: vec![Vec::new(); 10],
            transactions: HashMap::new(),
        })
    }

    fn served(&self, slot: usize, i: usize) -> Option<Served<'_>> {
        let (_, items) = self.wire.lists()[slot];
        Some(Served {
            item: items.get(i)?,
            json: self.json.get(slot)?.get(i)?,
        })
    }

    pub(crate) fn accounts(&self) -> Vec<Served<'_>> {
        (0..self.wire.accounts.len())
            .filter_map(|i| self.served(ACCOUNTS, i))
            .collect()
    }

    pub(crate) fn account(&self, id: &str) -> Option<Served<'_>> {
        let i = self
            .wire
            .accounts
            .iter()
            .position(|a| account_id(a) == Some(id))?;
        self.served(ACCOUNTS, i)
    }

    /// The items of `kind` of account `id`, in dataset order.
    pub(crate) fn of_account(&self, kind: Kind, id: &str) -> Vec<Served<'_>> {
        self.wire
            .list(kind)
            .iter()
            .enumerate()
            .filter(|(_, item)| account_id(item) == Some(id))
            .filter_map(|(i, _)| self.served(kind.slot(), i))
            .collect()
    }

    /// Account `id`'s transactions booked in `from..=to` (UTC).
    pub(crate) fn transactions(
        &self,
        id: &str,
        from: Option<NaiveDateTime>,
        to: Option<NaiveDateTime>,
    ) -> Vec<Served<'_>> {
        self.transactions
            .get(id)
            .into_iter()
            .flatten()
            .filter(|(booked, _)| match booked {
                Some(t) => from.is_none_or(|f| *t >= f) && to.is_none_or(|to| *t <= to),
                None => true,
            })
            .filter_map(|(_, i)| self.served(Kind::Transactions.slot(), *i))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn wire(v: Value) -> Result<DatasetWire, String> {
        serde_json::from_value(v).map_err(|e| e.to_string())
    }

    fn check(v: Value, expected: Result<(), &str>) {
        let got = wire(v.clone()).and_then(Dataset::new).map(drop);
        match (got, expected) {
            (Ok(()), Ok(())) => {}
            (Err(got), Err(want)) => assert!(got.contains(want), "{v}: {got}"),
            (got, want) => panic!("{v}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn datasets() {
        check(json!({}), Ok(()));
        check(
            json!({"accounts": [{"AccountId": "1"}], "transactions": []}),
            Ok(()),
        );
        check(
            json!({"transactions": [{"AccountId": "1", "Amount": {"Amount": 1.5}}]}),
            Ok(()),
        );
        check(
            json!({"accounts": [{}]}),
            Err("accounts[0]: AccountId must be a string"),
        );
        check(
            json!({"directDebits": [{"AccountId": 7}]}),
            Err("directDebits[0]: AccountId must be a string"),
        );
        check(json!({"acounts": []}), Err("unknown field `acounts`"));
        check(json!({"accounts": {}}), Err("invalid type"));
    }

    #[test]
    fn transaction_window() {
        let d = Dataset::new(
            wire(json!({"transactions": [
                {"AccountId": "1", "TransactionId": "a", "BookingDateTime": "2025-01-01T10:00:00+00:00"},
                {"AccountId": "1", "TransactionId": "b", "BookingDateTime": "2025-01-02T10:00:00+02:00"},
                {"AccountId": "1", "TransactionId": "c", "BookingDateTime": "garbage"},
                {"AccountId": "2", "TransactionId": "d", "BookingDateTime": "2025-01-03T10:00:00+00:00"}
            ]}))
            .unwrap(),
        )
        .unwrap();
        let ids = |from: &str, to: Option<&str>| -> Vec<String> {
            let parse = |s: &str| NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S").unwrap();
            d.transactions("1", Some(parse(from)), to.map(parse))
                .iter()
                .map(|t| t.item["TransactionId"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(ids("2025-01-01T00:00:00", None), ["a", "b", "c"]);
        assert_eq!(ids("2025-01-02T08:00:00", None), ["b", "c"]);
        assert_eq!(ids("2025-01-02T08:00:01", None), ["c"]);
        assert_eq!(
            ids("2025-01-01T00:00:00", Some("2025-01-01T10:00:00")),
            ["a", "c"]
        );
    }
}
