//! Synthetic data for a consent: a pure function of the consent key and an
//! anchor day.
//!
//! Everything but the dates (ids, counts, amounts, names, which transactions
//! are pending or have no id) depends on the key alone. Dates are offsets from
//! the anchor, 00:00 UTC of the day the simulator first saw the key; the dataset
//! is then kept in memory, so it does not move while the simulator runs.
//! Transactions fall in the 90 days before the anchor, the last two days'
//! ones pending.

use chrono::{DateTime, Datelike, Duration, NaiveDate, Utc};
use serde_json::{Map, Value, json};

use crate::dataset::DatasetWire;
use crate::prng::{SplitMix64, fnv1a64};

const HISTORY_DAYS: i64 = 90;
const PENDING_DAYS: i64 = 2;

const FIRST_NAMES: &[&str] = &[
    "Olivia", "Amelia", "Isla", "Ava", "Mia", "Oliver", "George", "Arthur", "Noah", "Leo", "Harry",
    "Priya", "Mohammed", "Sofia", "Aisha", "Kwame",
];
const SURNAMES: &[&str] = &[
    "Smith", "Jones", "Taylor", "Brown", "Williams", "Wilson", "Evans", "Patel", "Khan", "Thomas",
    "Roberts", "Walker", "Wright", "Okafor", "Murphy", "Campbell",
];
const STREETS: &[&str] = &[
    "High Street",
    "Station Road",
    "Church Lane",
    "Victoria Road",
    "Green Lane",
    "Park Road",
    "Mill Lane",
    "Queens Road",
];
const TOWNS: &[(&str, &str)] = &[
    ("London", "N1 9GU"),
    ("Manchester", "M1 1AE"),
    ("Leeds", "LS1 4DY"),
    ("Bristol", "BS1 5TR"),
    ("Glasgow", "G1 1XQ"),
    ("Cardiff", "CF10 1EP"),
    ("Belfast", "BT1 5GS"),
    ("Norwich", "NR2 1NH"),
];

/// A kind of everyday transaction: text, bank codes, amount range in pence,
/// merchant category (card payments) and direction.
struct Kind {
    text: &'static str,
    code: (&'static str, &'static str),
    proprietary: &'static str,
    pence: (u64, u64),
    mcc: Option<&'static str>,
    credit: bool,
}

const CARD: (&str, &str) = ("IssuedCreditTransfer", "CardPayment");

const KINDS: &[Kind] = &[
    Kind {
        text: "TESCO STORES 3041",
        code: CARD,
        proprietary: "CardPayment",
        pence: (150, 9_500),
        mcc: Some("5411"),
        credit: false,
    },
    Kind {
        text: "SAINSBURYS S/MKTS",
        code: CARD,
        proprietary: "CardPayment",
        pence: (200, 8_000),
        mcc: Some("5411"),
        credit: false,
    },
    Kind {
        text: "PRET A MANGER",
        code: CARD,
        proprietary: "CardPayment",
        pence: (250, 1_400),
        mcc: Some("5814"),
        credit: false,
    },
    Kind {
        text: "TFL TRAVEL CHARGE",
        code: CARD,
        proprietary: "CardPayment",
        pence: (175, 1_200),
        mcc: Some("4111"),
        credit: false,
    },
    Kind {
        text: "AMAZON.CO.UK",
        code: CARD,
        proprietary: "CardPayment",
        pence: (499, 12_000),
        mcc: Some("5999"),
        credit: false,
    },
    Kind {
        text: "SHELL FORECOURT",
        code: CARD,
        proprietary: "CardPayment",
        pence: (2_000, 9_000),
        mcc: Some("5541"),
        credit: false,
    },
    Kind {
        text: "BOOTS THE CHEMIST",
        code: CARD,
        proprietary: "CardPayment",
        pence: (300, 4_500),
        mcc: Some("5912"),
        credit: false,
    },
    Kind {
        text: "DELIVEROO",
        code: CARD,
        proprietary: "CardPayment",
        pence: (1_200, 4_000),
        mcc: Some("5812"),
        credit: false,
    },
    Kind {
        text: "CASH WITHDRAWAL LINK ATM",
        code: ("IssuedCashConcentrationTransactions", "CashWithdrawal"),
        proprietary: "Cash",
        pence: (1_000, 10_000),
        mcc: None,
        credit: false,
    },
    Kind {
        text: "FASTER PAYMENT FROM FRIEND",
        code: ("ReceivedCreditTransfer", "DomesticCreditTransfer"),
        proprietary: "Transfer",
        pence: (500, 15_000),
        mcc: None,
        credit: true,
    },
    Kind {
        text: "REFUND AMAZON.CO.UK",
        code: ("ReceivedCreditTransfer", "DomesticCreditTransfer"),
        proprietary: "Refund",
        pence: (499, 6_000),
        mcc: None,
        credit: true,
    },
];

fn pounds(pence: u64) -> String {
    format!("{}.{:02}", pence / 100, pence % 100)
}

fn money(pence: u64) -> Value {
    json!({"Amount": pounds(pence), "Currency": "GBP"})
}

/// `pence` signed: credit if ≥ 0.
fn signed_money(pence: i64) -> (Value, &'static str) {
    let indicator = if pence >= 0 { "Credit" } else { "Debit" };
    (money(pence.unsigned_abs()), indicator)
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S+00:00").to_string()
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        // Every caller passes a `json!({...})` literal.
        _ => Map::new(),
    }
}

/// One person, the consent's customer.
struct Person {
    first: &'static str,
    last: &'static str,
    party_id: String,
    party_number: String,
    mobile: String,
    building: u64,
    street: &'static str,
    town: (&'static str, &'static str),
}

impl Person {
    fn new(r: &mut SplitMix64, n: u64) -> Self {
        Self {
            first: r.pick(FIRST_NAMES),
            last: r.pick(SURNAMES),
            party_id: format!("P{:010x}{n}", r.next_u64() & 0xff_ffff_ffff),
            party_number: r.digits(10),
            mobile: format!("+44-7700{}", r.digits(6)),
            building: r.range(1, 220),
            street: r.pick(STREETS),
            town: r.pick(TOWNS),
        }
    }

    fn name(&self) -> String {
        format!("{} {}", self.first, self.last)
    }

    fn party(&self, account_id: &str, party_type: &str, role: &str) -> Map<String, Value> {
        object(json!({
            "AccountId": account_id,
            "PartyId": self.party_id,
            "PartyNumber": self.party_number,
            "PartyType": party_type,
            "Name": self.name(),
            "FullLegalName": self.name(),
            "LegalStructure": "UK.OBIE.Individual",
            "BeneficialOwnership": true,
            "AccountRole": role,
            "EmailAddress": format!("{}.{}@example.com", self.first.to_lowercase(), self.last.to_lowercase()),
            "Mobile": self.mobile,
            "Address": [{
                "AddressType": "Residential",
                "StreetName": self.street,
                "BuildingNumber": self.building.to_string(),
                "PostCode": self.town.1,
                "TownName": self.town.0,
                "Country": "GB"
            }]
        }))
    }
}

fn creditor(r: &mut SplitMix64, name: &str) -> Value {
    json!({
        "SchemeName": "UK.OBIE.SortCodeAccountNumber",
        "Identification": r.digits(14),
        "Name": name
    })
}

/// The dataset of consent key `key` anchored at `anchor` (00:00 UTC).
pub(crate) fn generate(key: &str, anchor: NaiveDate) -> DatasetWire {
    let root = SplitMix64::new(fnv1a64(key.as_bytes()));
    let anchor = anchor.and_time(chrono::NaiveTime::MIN).and_utc();
    let mut r = root.fork(0);
    let owner = Person::new(&mut r, 1);
    let partner = Person::new(&mut r, 2);
    let accounts = r.range(1, 3);
    let mut data = DatasetWire::default();
    for i in 0..accounts {
        let mut r = root.fork(i + 1);
        let current = i == 0 || r.chance(60);
        let joint = current && r.chance(30);
        let account_id = format!("{:010x}{i}", r.next_u64() & 0xff_ffff_ffff);
        let sort_code = format!("20{}", r.digits(4));
        let number = r.digits(8);
        let holder = if joint {
            format!("{} & {}", owner.name(), partner.name())
        } else {
            owner.name()
        };
        let (sub_type, description, nickname, product) = if current {
            (
                "CurrentAccount",
                "Personal current account",
                "Everyday",
                "PersonalCurrentAccount",
            )
        } else {
            ("Savings", "Instant access saver", "Rainy day", "Other")
        };
        data.accounts.push(object(json!({
            "AccountId": account_id,
            "Status": "Enabled",
            "StatusUpdateDateTime": rfc3339(anchor - Duration::days(400 + i as i64)),
            "Currency": "GBP",
            "AccountType": "Personal",
            "AccountSubType": sub_type,
            "Description": description,
            "Nickname": nickname,
            "OpeningDate": rfc3339(anchor - Duration::days(r.range(400, 4000) as i64)),
            "Account": [{
                "SchemeName": "UK.OBIE.SortCodeAccountNumber",
                "Identification": format!("{sort_code}{number}"),
                "Name": holder
            }],
            "Servicer": {"SchemeName": "UK.OBIE.BICFI", "Identification": "SIMBGB2LXXX"}
        })));

        let opening = r.range(20_000, 500_000) as i64;
        let (booked, pending) =
            transactions(&mut r, &mut data, &account_id, anchor, current, opening);
        let (amount, indicator) = signed_money(booked);
        let mut interim_booked = json!({
            "AccountId": account_id,
            "Amount": amount,
            "CreditDebitIndicator": indicator,
            "Type": "InterimBooked",
            "DateTime": rfc3339(anchor)
        });
        let (amount, indicator) = signed_money(booked + pending);
        let mut interim_available = json!({
            "AccountId": account_id,
            "Amount": amount,
            "CreditDebitIndicator": indicator,
            "Type": "InterimAvailable",
            "DateTime": rfc3339(anchor)
        });
        if current {
            let line = json!([{"Included": false, "Type": "Pre-Agreed", "Amount": money(50_000)}]);
            interim_available["CreditLine"] = line.clone();
            interim_booked["CreditLine"] = line;
        }
        data.balances.push(object(interim_available));
        data.balances.push(object(interim_booked));

        data.parties.push(owner.party(
            &account_id,
            if joint { "Joint" } else { "Sole" },
            "UK.OBIE.Principal",
        ));
        if joint {
            data.parties
                .push(partner.party(&account_id, "Joint", "UK.OBIE.SecondaryOwner"));
        }

        let payees = [
            "Landlord Ltd",
            "J Smith",
            "Savings Pot",
            "Allotment Society",
            "Sports Club",
        ];
        for b in 0..r.range(0, 3) {
            let name = r.pick(&payees);
            data.beneficiaries.push(object(json!({
                "AccountId": account_id,
                "BeneficiaryId": format!("B{account_id}{b}"),
                "BeneficiaryType": "Ordinary",
                "Reference": format!("REF {}", r.digits(6)),
                "CreditorAccount": creditor(&mut r, name)
            })));
        }

        if current {
            let billers = [
                "British Gas",
                "Thames Water",
                "Council Tax",
                "Vodafone",
                "Netflix",
                "Aviva Insurance",
            ];
            for d in 0..r.range(1, 3) {
                let last = anchor - Duration::days(r.range(3, 28) as i64);
                data.direct_debits.push(object(json!({
                    "AccountId": account_id,
                    "DirectDebitId": format!("DD{account_id}{d}"),
                    "MandateIdentification": format!("MANDATE-{}", r.digits(8)),
                    "DirectDebitStatusCode": "Active",
                    "Name": r.pick(&billers),
                    "PreviousPaymentDateTime": rfc3339(last),
                    "Frequency": "UK.OBIE.Monthly",
                    "PreviousPaymentAmount": money(r.range(900, 15_000))
                })));
            }
        }

        for s in 0..r.range(0, 2) {
            let day = r.range(1, 28);
            let first = anchor - Duration::days(r.range(100, 700) as i64);
            let next = anchor + Duration::days(r.range(1, 30) as i64);
            let amount = money(r.range(1_000, 50_000));
            let name = r.pick(&payees);
            data.standing_orders.push(object(json!({
                "AccountId": account_id,
                "StandingOrderId": format!("SO{account_id}{s}"),
                "Frequency": format!("IntrvlMnthDay:01:{day:02}"),
                "Reference": format!("SO REF {}", r.digits(4)),
                "FirstPaymentDateTime": rfc3339(first),
                "NextPaymentDateTime": rfc3339(next),
                "FirstPaymentAmount": amount,
                "NextPaymentAmount": amount,
                "StandingOrderStatusCode": "Active",
                "CreditorAccount": creditor(&mut r, name)
            })));
        }

        for p in 0..r.range(0, 2) {
            let when = anchor + Duration::days(r.range(5, 40) as i64);
            let name = r.pick(&payees);
            data.scheduled_payments.push(object(json!({
                "AccountId": account_id,
                "ScheduledPaymentId": format!("SP{account_id}{p}"),
                "ScheduledPaymentDateTime": rfc3339(when),
                "ScheduledType": "Execution",
                "Reference": format!("INV {}", r.digits(5)),
                "InstructedAmount": money(r.range(2_000, 80_000)),
                "CreditorAccount": creditor(&mut r, name)
            })));
        }

        // Monthly statements for the three whole months before the anchor.
        let mut end_month = NaiveDate::from_ymd_opt(anchor.year(), anchor.month(), 1)
            .unwrap_or(anchor.date_naive());
        for s in 0..3 {
            let start_month = end_month
                .checked_sub_months(chrono::Months::new(1))
                .unwrap_or(end_month);
            let start = start_month.and_time(chrono::NaiveTime::MIN).and_utc();
            let end = end_month.and_time(chrono::NaiveTime::MIN).and_utc() - Duration::seconds(1);
            let (closing, indicator) = signed_money(r.range(0, 600_000) as i64 - 50_000);
            data.statements.push(object(json!({
                "AccountId": account_id,
                "StatementId": format!("ST{account_id}{s}"),
                "StatementReference": format!("{:03}", 100 - s),
                "Type": "RegularPeriodic",
                "StartDateTime": rfc3339(start),
                "EndDateTime": rfc3339(end),
                "CreationDateTime": rfc3339(end + Duration::days(1)),
                "StatementDescription": [format!("{} statement", start_month.format("%B %Y"))],
                "StatementAmount": [{
                    "Amount": closing,
                    "CreditDebitIndicator": indicator,
                    "Type": "UK.OBIE.ClosingBalance"
                }]
            })));
            end_month = start_month;
        }

        data.products.push(object(json!({
            "AccountId": account_id,
            "ProductId": format!("PRD-{}", if current { "PCA" } else { "SAV" }),
            "ProductName": description,
            "ProductType": product
        })));
    }
    data
}

/// Adds an account's transactions; returns its booked balance and the sum of
/// its pending amounts, in pence.
fn transactions(
    r: &mut SplitMix64,
    data: &mut DatasetWire,
    account_id: &str,
    anchor: DateTime<Utc>,
    current: bool,
    opening: i64,
) -> (i64, i64) {
    let start = anchor - Duration::days(HISTORY_DAYS);
    let count = r.range(100, 300);
    // (booking time, kind index or salary, pence)
    let mut drafts: Vec<(DateTime<Utc>, Option<usize>, u64)> = (0..count)
        .map(|_| {
            let at = start + Duration::seconds(r.range(0, HISTORY_DAYS as u64 * 86_400 - 1) as i64);
            let k = r.range(0, KINDS.len() as u64 - 1) as usize;
            let (lo, hi) = KINDS[k].pence;
            (at, Some(k), r.range(lo, hi))
        })
        .collect();
    if current {
        // Salary on the 25th of each month in the window.
        let pay = r.range(180_000, 350_000);
        let mut day = start.date_naive();
        while day < anchor.date_naive() {
            if day.day() == 25 {
                let at = day.and_hms_opt(6, 0, 0).unwrap_or_default().and_utc();
                drafts.push((at, None, pay));
            }
            day = day.succ_opt().unwrap_or(day + Duration::days(1));
        }
    }
    drafts.sort_by_key(|d| d.0);
    let n = drafts.len();
    // A few booked transactions without a TransactionId (cash, as some banks do).
    // Drawn from the older half, which is all booked.
    let idless: Vec<usize> = (0..r.range(2, 4))
        .map(|_| r.range(0, n as u64 / 2) as usize)
        .collect();
    let pending_from = anchor - Duration::days(PENDING_DAYS);
    let (mut booked, mut pending) = (opening, 0_i64);
    for (idx, (at, kind, pence)) in drafts.into_iter().enumerate() {
        // The last two are pending whatever their time, so every account has some.
        let is_pending = at >= pending_from || idx + 2 >= n;
        let (text, code, proprietary, mcc, credit) = match kind {
            Some(k) => {
                let k = &KINDS[k];
                (k.text, k.code, k.proprietary, k.mcc, k.credit)
            }
            None => (
                "SALARY ACME LTD",
                ("ReceivedCreditTransfer", "DomesticCreditTransfer"),
                "BankGiroCredit",
                None,
                true,
            ),
        };
        let signed = if credit {
            pence as i64
        } else {
            -(pence as i64)
        };
        let mut tx = json!({
            "AccountId": account_id,
            "TransactionId": format!("T{account_id}{idx:05}"),
            "TransactionReference": format!("{}", r.digits(10)),
            "Amount": money(pence),
            "CreditDebitIndicator": if credit { "Credit" } else { "Debit" },
            "Status": if is_pending { "Pending" } else { "Booked" },
            "TransactionMutability": if is_pending { "Mutable" } else { "Immutable" },
            "BookingDateTime": rfc3339(at),
            "TransactionInformation": text,
            "BankTransactionCode": {"Code": code.0, "SubCode": code.1},
            "ProprietaryBankTransactionCode": {"Code": proprietary, "Issuer": "SimBank"}
        });
        if let Some(mcc) = mcc {
            tx["MerchantDetails"] = json!({"MerchantName": text, "MerchantCategoryCode": mcc});
        }
        if is_pending {
            pending += signed;
        } else {
            booked += signed;
            tx["ValueDateTime"] = Value::String(rfc3339(at));
            let (amount, indicator) = signed_money(booked);
            tx["Balance"] = json!({"Amount": amount, "CreditDebitIndicator": indicator, "Type": "InterimBooked"});
            if idless.contains(&idx)
                && let Some(t) = tx.as_object_mut()
            {
                t.remove("TransactionId");
                t.insert(
                    "TransactionInformation".into(),
                    "CASH DEPOSIT AT BRANCH".into(),
                );
            }
        }
        data.transactions.push(object(tx));
    }
    (booked, pending)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anchor() -> NaiveDate {
        NaiveDate::from_ymd_opt(2025, 3, 15).unwrap()
    }

    #[test]
    fn same_key_same_data() {
        let a = serde_json::to_value(generate("consent-key-1", anchor())).unwrap();
        let b = serde_json::to_value(generate("consent-key-1", anchor())).unwrap();
        let c = serde_json::to_value(generate("consent-key-2", anchor())).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn shape_of_the_data() {
        for key in ["a", "b", "c", "d", "e", "f", "g", "h"] {
            let d = generate(key, anchor());
            assert!((1..=3).contains(&d.accounts.len()), "{key}");
            assert_eq!(d.balances.len(), 2 * d.accounts.len());
            assert_eq!(d.products.len(), d.accounts.len());
            assert_eq!(d.statements.len(), 3 * d.accounts.len());
            assert!(d.parties.len() >= d.accounts.len());
            for account in &d.accounts {
                let id = &account["AccountId"];
                let txs: Vec<_> = d
                    .transactions
                    .iter()
                    .filter(|t| &t["AccountId"] == id)
                    .collect();
                assert!((100..=310).contains(&txs.len()), "{key}: {}", txs.len());
                let pending = txs.iter().filter(|t| t["Status"] == "Pending").count();
                let idless = txs
                    .iter()
                    .filter(|t| !t.contains_key("TransactionId"))
                    .count();
                assert!(pending >= 2, "{key}: {pending} pending");
                assert!((1..=4).contains(&idless), "{key}: {idless} without id");
                let newest = txs
                    .iter()
                    .map(|t| t["BookingDateTime"].as_str().unwrap())
                    .max()
                    .unwrap();
                let oldest = txs
                    .iter()
                    .map(|t| t["BookingDateTime"].as_str().unwrap())
                    .min()
                    .unwrap();
                assert!(newest < "2025-03-15", "{newest}");
                assert!(oldest >= "2024-12-15", "{oldest}");
            }
        }
    }
}
