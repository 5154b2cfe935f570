//! Deciding a group of quota reservations at once (both backends): which rows get room, in
//! order, and in what order the counter rows are locked so that two daemons reserving at the
//! same time cannot deadlock (each account's day counter first, then its templates' months,
//! accounts and templates sorted).

use std::collections::BTreeMap;

use super::{QuotaReservation, Reserved};

/// The rows of one group that count against the same pair of counters.
pub(crate) struct CounterPair<'a> {
    pub template_id: &'a str,
    pub month: &'a str,
    pub day: &'a str,
    pub monthly_limit: u32,
    pub daily_limit: u32,
    /// Indexes into the group, in the group's order.
    pub rows: Vec<usize>,
}

/// The rows still ours (`marked`), by account (sorted) and then by counter pair (sorted):
/// the order in which their counters are locked.
pub(crate) fn counter_pairs<'a>(
    items: &[QuotaReservation<'a>],
    marked: &[bool],
) -> BTreeMap<&'a str, Vec<CounterPair<'a>>> {
    let mut pairs: BTreeMap<(&'a str, &'a str, &'a str, &'a str), CounterPair<'a>> =
        BTreeMap::new();
    for (i, r) in items.iter().enumerate().filter(|(i, _)| marked[*i]) {
        pairs
            .entry((r.account, r.template_id, r.month, r.day))
            .or_insert_with(|| CounterPair {
                template_id: r.template_id,
                month: r.month,
                day: r.day,
                monthly_limit: r.monthly_limit,
                daily_limit: r.daily_limit,
                rows: Vec::new(),
            })
            .rows
            .push(i);
    }
    let mut by_account: BTreeMap<&'a str, Vec<CounterPair<'a>>> = BTreeMap::new();
    for ((account, ..), pair) in pairs {
        by_account.entry(account).or_default().push(pair);
    }
    by_account
}

/// Given the room left in the month and the day, decides `n` rows in order: the first ones
/// that fit both are granted; the rest wait for whichever counter is full.
pub(crate) fn decide(n: usize, month_room: i64, day_room: i64) -> Vec<Reserved> {
    (0..n as i64)
        .map(|i| {
            if i >= month_room {
                Reserved::MonthFull
            } else if i >= day_room {
                Reserved::DayFull
            } else {
                Reserved::Granted
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_granted_in_order_until_a_counter_is_full() {
        use Reserved::*;
        assert_eq!(decide(3, 10, 10), [Granted, Granted, Granted]);
        assert_eq!(decide(3, 1, 10), [Granted, MonthFull, MonthFull]);
        assert_eq!(decide(3, 10, 2), [Granted, Granted, DayFull]);
        assert_eq!(decide(3, 2, 1), [Granted, DayFull, MonthFull]);
        assert_eq!(decide(2, 0, 5), [MonthFull, MonthFull]);
        assert_eq!(decide(2, -3, -1), [MonthFull, MonthFull]);
    }
}
