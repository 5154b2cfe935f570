//! Counting a group of quota reservations at once (both backends; each gives its two SQL
//! statements through `Counters`): which rows get room, in
//! order, and in what order the counter rows are locked so that two daemons reserving at the
//! same time cannot deadlock (each account's day counter first, then its templates' months,
//! accounts and templates sorted).

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};

use super::{Claimed, CountTerms, Countable, QuotaReservation, Reserved, StoreResult};
use crate::domain::message::RawMessage;
use crate::domain::quota::{ACCOUNT_SCOPE, template_scope};

/// The rows of one group that count against the same pair of counters.
pub(crate) struct CounterPair<'g, 'a> {
    /// The first of them; the others share its account, template, periods and limits.
    pub first: &'g QuotaReservation<'a>,
    /// Indexes into the group, in the group's order.
    pub rows: Vec<usize>,
}

/// The rows still ours (`marked`), by account (sorted) and then by counter pair (sorted):
/// the order in which their counters are locked.
pub(crate) fn counter_pairs<'g, 'a>(
    items: &'g [QuotaReservation<'a>],
    marked: &[bool],
) -> BTreeMap<&'a str, Vec<CounterPair<'g, 'a>>> {
    let mut pairs: BTreeMap<(&'a str, &'a str, &'a str, &'a str), CounterPair<'g, 'a>> =
        BTreeMap::new();
    for (i, r) in items.iter().enumerate().filter(|(i, _)| marked[*i]) {
        pairs
            .entry((r.account, r.template_id, r.month, r.day))
            .or_insert_with(|| CounterPair {
                first: r,
                rows: Vec::new(),
            })
            .rows
            .push(i);
    }
    let mut by_account: BTreeMap<&'a str, Vec<CounterPair<'g, 'a>>> = BTreeMap::new();
    for ((account, ..), pair) in pairs {
        by_account.entry(account).or_default().push(pair);
    }
    by_account
}

/// The two statements a backend runs inside its reservation transaction.
pub(crate) trait Counters {
    /// Locks a counter row (creating it at 0) for the rest of the transaction; its count.
    async fn lock(&mut self, account: &str, scope: &str, period: &str) -> StoreResult<i64>;
    /// Adds `n` to a counter this transaction has locked.
    async fn add(&mut self, account: &str, scope: &str, period: &str, n: i64) -> StoreResult<()>;
}

/// Counts the rows still ours (`marked`) against their counters: locks each counter once, in
/// the order of `counter_pairs`, grants rows in order while both have room and adds what was
/// granted. Rows not marked stay `LeaseLost`.
pub(crate) async fn count<C: Counters>(
    counters: &mut C,
    items: &[QuotaReservation<'_>],
    marked: &[bool],
) -> StoreResult<Vec<Reserved>> {
    let mut results = vec![Reserved::LeaseLost; items.len()];
    for (account, pairs) in counter_pairs(items, marked) {
        let mut days: Vec<&str> = pairs.iter().map(|p| p.first.day).collect();
        days.sort_unstable();
        days.dedup();
        let mut day_used = HashMap::new();
        for day in days {
            day_used.insert(day, counters.lock(account, ACCOUNT_SCOPE, day).await?);
        }
        for pair in &pairs {
            let r = pair.first;
            let scope = template_scope(r.template_id);
            let month_used = counters.lock(account, &scope, r.month).await?;
            let today = day_used[r.day];
            let decisions = decide(
                pair.rows.len(),
                i64::from(r.monthly_limit) - month_used,
                i64::from(r.daily_limit) - today,
            );
            let granted = decisions
                .iter()
                .filter(|d| **d == Reserved::Granted)
                .count() as i64;
            if granted > 0 {
                counters.add(account, &scope, r.month, granted).await?;
                counters.add(account, ACCOUNT_SCOPE, r.day, granted).await?;
                day_used.insert(r.day, today + granted);
            }
            for (&i, decision) in pair.rows.iter().zip(decisions) {
                results[i] = decision;
            }
        }
    }
    Ok(results)
}

/// The claimed rows `countable` gives terms for, as reservations (in claim order), and each
/// row's terms.
pub(crate) fn claim_reservations<'a>(
    owner: &'a str,
    rows: &'a [RawMessage],
    terms: &'a [Option<CountTerms>],
    now: DateTime<Utc>,
) -> Vec<QuotaReservation<'a>> {
    rows.iter()
        .zip(terms)
        .filter_map(|(raw, terms)| {
            let t = terms.as_ref()?;
            Some(QuotaReservation {
                owner,
                id: raw.id,
                account: &raw.account,
                template_id: &t.template_id,
                month: &t.month,
                day: &t.day,
                monthly_limit: t.monthly_limit,
                daily_limit: t.daily_limit,
                now,
            })
        })
        .collect()
}

/// Each row's terms under `countable`.
pub(crate) fn terms(rows: &[RawMessage], countable: Countable<'_>) -> Vec<Option<CountTerms>> {
    rows.iter().map(countable).collect()
}

/// The claimed rows with the results of those counted (`results` in the order of
/// `claim_reservations`).
pub(crate) fn claimed(
    rows: Vec<RawMessage>,
    terms: &[Option<CountTerms>],
    results: Vec<Reserved>,
) -> Vec<Claimed> {
    let mut results = results.into_iter();
    rows.into_iter()
        .zip(terms)
        .map(|(raw, terms)| Claimed {
            raw,
            reserved: terms.as_ref().and_then(|_| results.next()),
        })
        .collect()
}

/// The rows that must wait for a full counter: their periods are taken off again.
pub(crate) fn waiting(items: &[QuotaReservation<'_>], results: &[Reserved]) -> Vec<i64> {
    items
        .iter()
        .zip(results)
        .filter(|(_, result)| matches!(result, Reserved::MonthFull | Reserved::DayFull))
        .map(|(r, _)| r.id)
        .collect()
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
