//! The gate's epoch keys: one per Redis Cluster hash slot, so that every script can
//! tell, on its own slot, whether Redis still holds the gate's state.
//!
//! A rebuild from PostgreSQL writes every epoch key last. A key that is missing means
//! its slot's state is gone (a restart without persistence, a failover to an empty
//! replica, a flush) and the scripts refuse until the state is rebuilt. A single
//! Redis uses the same 16 384 keys: one layout for both setups, and on a cluster a
//! node that loses its data loses exactly the epochs of the slots it held.

use std::sync::LazyLock;

/// Hash slots of a Redis Cluster.
pub(super) const SLOTS: usize = 16_384;

/// CRC16-CCITT (XMODEM), the checksum Redis Cluster maps keys to slots with.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of a key whose hash tag is `tag` (the text between the braces).
pub(super) fn slot(tag: &str) -> usize {
    usize::from(crc16(tag.as_bytes())) % SLOTS
}

/// For each slot, a number `k` whose tag `e:<k>` lies in that slot.
static TAGS: LazyLock<Vec<u32>> = LazyLock::new(|| {
    let mut tags = vec![u32::MAX; SLOTS];
    let mut missing = SLOTS;
    // About 170 000 candidates fill every slot (coupon collector); the bound only
    // keeps the loop finite.
    for k in 0..u32::MAX {
        let slot = slot(&format!("e:{k}"));
        if let Some(entry) = tags.get_mut(slot)
            && *entry == u32::MAX
        {
            *entry = k;
            missing -= 1;
            if missing == 0 {
                break;
            }
        }
    }
    tags
});

/// The epoch key in the same slot as the keys tagged `tag`.
pub(super) fn key_for(namespace: &str, tag: &str) -> String {
    key_at(namespace, slot(tag))
}

/// The epoch key of slot `slot`.
pub(super) fn key_at(namespace: &str, slot: usize) -> String {
    let k = TAGS.get(slot).copied().unwrap_or_default();
    format!("{namespace}:{{e:{k}}}:epoch")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_those_of_redis_cluster() {
        // CRC16/XMODEM's check value, and `CLUSTER KEYSLOT` answers.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot("foo"), 12_182);
        assert_eq!(slot("somekey"), 11_058);
    }

    #[test]
    fn every_slot_has_an_epoch_key_in_it() {
        for s in 0..SLOTS {
            let key = key_at("ns", s);
            let tag = key
                .split_once('{')
                .and_then(|(_, rest)| rest.split_once('}'))
                .map(|(tag, _)| tag)
                .unwrap();
            assert_eq!(slot(tag), s, "{key}");
        }
        let tag = "c:0190f2a0-0000-7000-8000-000000000000";
        assert_eq!(key_for("ns", tag), key_at("ns", slot(tag)));
    }
}
