//! Counting the schema deviations a connector read past.

use std::collections::BTreeMap;

/// Tolerated deviations by kind. Kinds are fixed names so they can be metric
/// labels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Deviations(BTreeMap<&'static str, u64>);

impl Deviations {
    pub(crate) fn note(&mut self, kind: &'static str) {
        *self.0.entry(kind).or_default() += 1;
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn into_map(self) -> BTreeMap<&'static str, u64> {
        self.0
    }
}

/// `Data.Balance` was one object where the schema wants an array.
pub(crate) const BALANCE_OBJECT_NOT_ARRAY: &str = "balance_object_not_array";
/// `Data.Balance` was an empty array (the schema wants at least one).
pub(crate) const BALANCE_ARRAY_EMPTY: &str = "balance_array_empty";
/// A list under `Data` other than `Balance` was one object, not an array.
pub(crate) const ITEM_OBJECT_NOT_ARRAY: &str = "item_object_not_array";
/// A party's `Address` was one object, not an array.
pub(crate) const PARTY_ADDRESS_OBJECT_NOT_ARRAY: &str = "party_address_object_not_array";
/// A party's `Relationships` was an array, not an object.
pub(crate) const PARTY_RELATIONSHIPS_ARRAY_NOT_OBJECT: &str =
    "party_relationships_array_not_object";
/// `Links`/`Meta` were inside `Data` rather than beside it.
pub(crate) const LINKS_INSIDE_DATA: &str = "links_inside_data";
/// The required top-level `Links` was missing.
pub(crate) const LINKS_MISSING: &str = "links_missing";
/// An optional date-time field was not an ISO 8601 date-time; left unread.
pub(crate) const DATE_TIME_INVALID: &str = "date_time_invalid";
/// A date-time had no offset; read as UTC.
pub(crate) const DATE_TIME_WITHOUT_OFFSET: &str = "date_time_without_offset";
/// An item of a per-account endpoint had no `AccountId`; the path's was used.
pub(crate) const ACCOUNT_ID_MISSING: &str = "account_id_missing";
/// A `TransactionId` was an empty string; read as no id.
pub(crate) const TRANSACTION_ID_EMPTY: &str = "transaction_id_empty";
/// The same `TransactionId` came twice for one account; the last one was kept.
pub(crate) const DUPLICATE_TRANSACTION_ID: &str = "duplicate_transaction_id";
/// An optional initial-load endpoint answered 403/404/405/501; skipped.
pub(crate) const OPTIONAL_RESOURCE_UNAVAILABLE: &str = "optional_resource_unavailable";
/// A link was a bare string where the schema wants `{"href": ...}` (NextGenPSD2).
pub(crate) const LINK_NOT_OBJECT: &str = "link_not_object";
/// A booked transaction had no `bookingDate`; its value or transaction date was used
/// (NextGenPSD2).
pub(crate) const BOOKING_DATE_MISSING: &str = "booking_date_missing";
