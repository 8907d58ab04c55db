//! A pure model of the stagger's start slots with the fair share of SPEC §6: the
//! reference the `take_slot` script is checked against on random sequences of
//! requests and clock steps, and the place its promises are proved for any arrival
//! pattern (no period holds more than `stagger.limit` slots; `AUTOSYNC` never more
//! than its share).
//!
//! Like the script it works in whole milliseconds, with the spacings the gate passes
//! it ([`StaggerSettings::slot_spacings_ms`]): on-demand requests follow one chain `spacing` apart,
//! auto-syncs their own `autosync spacing` apart, and every slot of the bucket stays
//! at least `spacing` from every other. Expiry of the script's keys is left out: a
//! chain's key lives a period past its slot and the slot set a period past its
//! newest slot, both longer than any spacing, so expiry never changes a decision.

use crate::{STAGGER_MAX_MS, StaggerSettings};

/// Which chain a request follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SlotClass {
    /// `API`, `PORTAL`, `APP`, `ADMIN`.
    OnDemand,
    /// `AUTOSYNC`, held to `stagger.autosync_share`.
    Autosync,
}

/// The model's answer to one request at an instant (ms).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotDecision {
    /// Start at this instant (ms).
    Slot(i64),
    /// The earliest free slot is past `stagger.max_delay_secs`, by this much (ms);
    /// nothing is taken.
    Full { over_ms: i64 },
}

/// One stagger bucket's state: each chain's last slot and every slot not yet past.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaggerModel {
    spacing: i64,
    autosync_spacing: i64,
    max_delay: i64,
    last: [Option<i64>; 2],
    /// Every slot handed out that is not yet `spacing` past, ascending.
    slots: Vec<i64>,
}

impl StaggerModel {
    /// An empty bucket under `settings`.
    pub fn new(settings: &StaggerSettings) -> Self {
        let (spacing, autosync_spacing) = settings.slot_spacings_ms();
        let max_delay = i64::try_from(settings.max_delay_secs)
            .ok()
            .and_then(|s| s.checked_mul(1000))
            .map_or(STAGGER_MAX_MS, |ms| ms.min(STAGGER_MAX_MS));
        Self {
            spacing,
            autosync_spacing,
            max_delay,
            last: [None, None],
            slots: Vec::new(),
        }
    }

    /// The spacing of any two slots of the bucket (ms).
    pub fn spacing_ms(&self) -> i64 {
        self.spacing
    }

    /// The spacing of the auto-sync chain (ms).
    pub fn autosync_spacing_ms(&self) -> i64 {
        self.autosync_spacing
    }

    fn chain(class: SlotClass) -> usize {
        match class {
            SlotClass::OnDemand => 0,
            SlotClass::Autosync => 1,
        }
    }

    /// Decides a request of `class` at `now` (ms) and, if it gets a slot, takes it.
    pub fn take(&mut self, class: SlotClass, now: i64) -> SlotDecision {
        let own = match class {
            SlotClass::OnDemand => self.spacing,
            SlotClass::Autosync => self.autosync_spacing,
        };
        let mut slot = now;
        if let Some(last) = self.last[Self::chain(class)]
            && last + own > now
        {
            slot = last + own;
        }
        // Slots more than a spacing past keep nothing away any more.
        let spacing = self.spacing;
        self.slots.retain(|s| *s >= now - spacing);
        while slot - now <= self.max_delay {
            // The last slot of the bucket too near the candidate; past it.
            let near = self
                .slots
                .iter()
                .rev()
                .find(|s| **s > slot - spacing && **s < slot + spacing);
            match near {
                Some(s) => slot = *s + spacing,
                None => break,
            }
        }
        if slot - now > self.max_delay {
            return SlotDecision::Full {
                over_ms: slot - now - self.max_delay,
            };
        }
        self.last[Self::chain(class)] = Some(slot);
        let at = self.slots.partition_point(|s| *s <= slot);
        self.slots.insert(at, slot);
        SlotDecision::Slot(slot)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::StaggerScope;

    fn settings(limit: u32, period_secs: u64, max_delay_secs: u64, share: f64) -> StaggerSettings {
        StaggerSettings {
            limit,
            period_secs,
            max_delay_secs,
            scope: StaggerScope::Global,
            autosync_share: share,
        }
    }

    /// The most of `slots` (any order) in any half-open window `[s, s + period)`.
    fn most_in_a_period(slots: &[i64], period: i64) -> usize {
        let mut sorted = slots.to_vec();
        sorted.sort_unstable();
        (0..sorted.len())
            .map(|i| {
                sorted[i..]
                    .iter()
                    .take_while(|s| **s - sorted[i] < period)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn chains_and_the_fair_share() {
        // 4 per 4 s: 1 s apart; auto-syncs half of it: 2 s apart.
        let mut m = StaggerModel::new(&settings(4, 4, 10, 0.5));
        let take = |m: &mut StaggerModel, class, now| m.take(class, now);
        use SlotClass::{Autosync as A, OnDemand as D};
        assert_eq!(take(&mut m, A, 0), SlotDecision::Slot(0));
        assert_eq!(take(&mut m, A, 0), SlotDecision::Slot(2_000));
        assert_eq!(take(&mut m, A, 0), SlotDecision::Slot(4_000));
        // On-demand starts as if no auto-sync were queued, past the one in its way.
        assert_eq!(take(&mut m, D, 0), SlotDecision::Slot(1_000));
        assert_eq!(take(&mut m, D, 0), SlotDecision::Slot(3_000));
        assert_eq!(take(&mut m, D, 0), SlotDecision::Slot(5_000));
        // The horizon: 10 s.
        for _ in 0..3 {
            take(&mut m, A, 0);
        }
        assert_eq!(take(&mut m, A, 0), SlotDecision::Full { over_ms: 2_000 });
        // Time passes: a chain whose last slot is behind starts now.
        assert_eq!(take(&mut m, D, 60_000), SlotDecision::Slot(60_000));
        assert_eq!(take(&mut m, D, 60_500), SlotDecision::Slot(61_000));
    }

    #[derive(Clone, Debug)]
    struct Arrival {
        autosync: bool,
        /// Milliseconds since the previous arrival.
        step: i64,
    }

    fn arrivals() -> impl Strategy<Value = Vec<Arrival>> {
        prop::collection::vec(
            (
                any::<bool>(),
                prop_oneof![Just(0_i64), 0_i64..50, 0_i64..3_000, 0_i64..30_000],
            )
                .prop_map(|(autosync, step)| Arrival { autosync, step }),
            1..120,
        )
    }

    fn stagger() -> impl Strategy<Value = StaggerSettings> {
        (
            1_u32..12,
            1_u64..10,
            0_u64..40,
            prop_oneof![Just(0.5), Just(1.0), Just(0.1), 0.05_f64..=1.0],
        )
            .prop_map(|(limit, period, delay, share)| settings(limit, period, delay, share))
    }

    proptest! {
        /// No window of `period` holds more than `limit` slots, nor more than the
        /// auto-sync share of auto-syncs, whatever the arrivals; every slot lies in
        /// `[now, now + max_delay]`, and each chain's slots come in order.
        #[test]
        fn no_period_holds_more_than_the_limit_nor_autosync_more_than_its_share(
            s in stagger(),
            pattern in arrivals(),
        ) {
            let mut model = StaggerModel::new(&s);
            let period = i64::try_from(s.period_secs).unwrap() * 1000;
            let max_delay = i64::try_from(s.max_delay_secs).unwrap() * 1000;
            let (mut all, mut autosync, mut on_demand) = (Vec::new(), Vec::new(), Vec::new());
            let mut now = 1_000_000;
            for a in &pattern {
                now += a.step;
                let class = if a.autosync { SlotClass::Autosync } else { SlotClass::OnDemand };
                if let SlotDecision::Slot(slot) = model.take(class, now) {
                    prop_assert!(slot >= now && slot - now <= max_delay, "{slot} at {now}");
                    let chain = if a.autosync { &mut autosync } else { &mut on_demand };
                    prop_assert!(chain.last().is_none_or(|l| *l < slot));
                    chain.push(slot);
                    all.push(slot);
                }
            }
            prop_assert!(most_in_a_period(&all, period) <= s.limit as usize, "{all:?}");
            prop_assert!(
                most_in_a_period(&autosync, period) <= s.autosync_limit() as usize,
                "{autosync:?} over {} per period", s.autosync_limit()
            );
        }

        /// A full bucket takes nothing: the same request decided again at once gets
        /// the same answer, and an on-demand request admitted alone starts now.
        #[test]
        fn a_refusal_takes_nothing(s in stagger(), pattern in arrivals()) {
            let mut model = StaggerModel::new(&s);
            let mut now = 0;
            for a in &pattern {
                now += a.step;
                let class = if a.autosync { SlotClass::Autosync } else { SlotClass::OnDemand };
                let before = model.clone();
                if let d @ SlotDecision::Full { .. } = model.take(class, now) {
                    let mut again = before.clone();
                    prop_assert_eq!(again.take(class, now), d);
                }
            }
            let mut fresh = StaggerModel::new(&s);
            prop_assert_eq!(fresh.take(SlotClass::OnDemand, now), SlotDecision::Slot(now));
        }

        /// The fair share (SPEC §6): however many auto-syncs are queued, an
        /// on-demand request whose own chain is free starts less than two spacings
        /// after it would without them (it steps past at most the one auto-sync slot
        /// in its way), as long as auto-syncs take at most half of the limit.
        #[test]
        fn on_demand_is_not_queued_behind_autosyncs(
            s in stagger(),
            queued in 0_usize..40,
            wait in 0_i64..5_000,
        ) {
            prop_assume!(2 * s.autosync_limit() <= s.limit);
            let mut model = StaggerModel::new(&s);
            let now = 10_000_000;
            for _ in 0..queued {
                model.take(SlotClass::Autosync, now);
            }
            let at = now + wait;
            prop_assert_eq!(
                StaggerModel::new(&s).take(SlotClass::OnDemand, at),
                SlotDecision::Slot(at)
            );
            let spacing = model.spacing_ms();
            match model.take(SlotClass::OnDemand, at) {
                SlotDecision::Slot(slot) => prop_assert!(
                    slot >= at && slot < at + 2 * spacing,
                    "queued behind the auto-syncs: {} at {} (spacing {}, auto-sync spacing {})",
                    slot, at, spacing, model.autosync_spacing_ms()
                ),
                full => prop_assert!(
                    i64::try_from(s.max_delay_secs).unwrap() * 1000 < 2 * spacing,
                    "{:?} with a horizon of {} s", full, s.max_delay_secs
                ),
            }
        }
    }
}
