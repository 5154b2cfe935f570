//! Counting a group of quota reservations at once (both backends; each gives its two SQL
//! statements through `Counters`): which rows get room, in
//! order, and in what order the counter rows are locked so that two daemons reserving at the
//! same time cannot deadlock (each account's day counter first, then its templates' months,
//! accounts and templates sorted).

use std::collections::{BTreeMap, HashMap};

use super::{
    ClaimRequest, Claimed, CountTerms, Countable, QuotaReservation, Reserved, StoreResult,
};
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

/// One counter row of `quota_usage`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct CounterKey {
    pub account: String,
    pub scope: String,
    pub period: String,
}

impl CounterKey {
    fn new(account: &str, scope: &str, period: &str) -> CounterKey {
        CounterKey {
            account: account.to_string(),
            scope: scope.to_string(),
            period: period.to_string(),
        }
    }
}

/// The statements a backend runs inside its reservation transaction (each dialect's
/// `Counters`), the group's rows marked and unmarked and its counters locked and added to.
pub(crate) trait Counters {
    /// Writes each row's periods if it is still in flight under its owner's lease; the ids
    /// written.
    async fn mark(&mut self, items: &[QuotaReservation<'_>]) -> StoreResult<Vec<i64>>;
    /// Takes the periods off rows that were not counted after all.
    async fn unmark(&mut self, ids: Vec<i64>) -> StoreResult<()>;
    /// Locks counter rows (creating each at 0) in the order given, for the rest of the
    /// transaction; each one's count.
    async fn lock_all(&mut self, keys: &[CounterKey]) -> StoreResult<HashMap<CounterKey, i64>>;
    /// Adds to counters this transaction has locked.
    async fn add_all(&mut self, adds: &[(CounterKey, i64)]) -> StoreResult<()>;
}

/// Reserves quota for a group of rows inside one transaction (see
/// `Store::reserve_quota_many`): mark the rows still ours, count them, unmark those that must
/// wait.
pub(crate) async fn reserve<C: Counters>(
    counters: &mut C,
    items: &[QuotaReservation<'_>],
) -> StoreResult<Vec<Reserved>> {
    let marked_ids = counters.mark(items).await?;
    let marked = super::written(items, |r| r.id, marked_ids);
    let results = count(counters, items, &marked).await?;
    let waiting = waiting(items, &results);
    if !waiting.is_empty() {
        counters.unmark(waiting).await?;
    }
    Ok(results)
}

/// Counts the rows still ours (`marked`) against their counters: locks every counter the
/// group needs at once, in the order of `counter_pairs` (each account's days, then its
/// templates' months), grants rows in order while both of a row's counters have room, and
/// adds what was granted. Rows not marked stay `LeaseLost`.
pub(crate) async fn count<C: Counters>(
    counters: &mut C,
    items: &[QuotaReservation<'_>],
    marked: &[bool],
) -> StoreResult<Vec<Reserved>> {
    let mut results = vec![Reserved::LeaseLost; items.len()];
    let by_account = counter_pairs(items, marked);
    let keys = lock_order(&by_account);
    if keys.is_empty() {
        return Ok(results);
    }
    let mut used = counters.lock_all(&keys).await?;
    let mut added: HashMap<CounterKey, i64> = HashMap::new();
    for pair in by_account.values().flatten() {
        let r = pair.first;
        let month = CounterKey::new(r.account, &template_scope(r.template_id), r.month);
        let day = CounterKey::new(r.account, ACCOUNT_SCOPE, r.day);
        let (month_used, day_used) = (used[&month], used[&day]);
        let decisions = decide(
            pair.rows.len(),
            i64::from(r.monthly_limit) - month_used,
            i64::from(r.daily_limit) - day_used,
        );
        let granted = decisions
            .iter()
            .filter(|d| **d == Reserved::Granted)
            .count() as i64;
        for key in [month, day] {
            *used.get_mut(&key).expect("locked above") += granted;
            *added.entry(key).or_default() += granted;
        }
        for (&i, decision) in pair.rows.iter().zip(decisions) {
            results[i] = decision;
        }
    }
    let adds: Vec<(CounterKey, i64)> = keys
        .into_iter()
        .filter_map(|key| {
            let n = added.get(&key).copied().unwrap_or(0);
            (n > 0).then_some((key, n))
        })
        .collect();
    if !adds.is_empty() {
        counters.add_all(&adds).await?;
    }
    Ok(results)
}

/// Every counter the pairs need, once each, in the order they are locked.
fn lock_order(by_account: &BTreeMap<&str, Vec<CounterPair<'_, '_>>>) -> Vec<CounterKey> {
    let mut keys = Vec::new();
    for (account, pairs) in by_account {
        let mut days: Vec<&str> = pairs.iter().map(|p| p.first.day).collect();
        days.sort_unstable();
        days.dedup();
        keys.extend(
            days.iter()
                .map(|day| CounterKey::new(account, ACCOUNT_SCOPE, day)),
        );
        for pair in pairs {
            let month = CounterKey::new(
                account,
                &template_scope(pair.first.template_id),
                pair.first.month,
            );
            if !keys.contains(&month) {
                keys.push(month);
            }
        }
    }
    keys
}

/// The claimed rows `countable` gives terms for, as reservations (in claim order), and each
/// row's terms.
pub(crate) fn claim_reservations<'a>(
    request: &'a ClaimRequest<'a>,
    rows: &'a [RawMessage],
    terms: &'a [Option<CountTerms>],
) -> Vec<QuotaReservation<'a>> {
    rows.iter()
        .zip(terms)
        .filter_map(|(raw, terms)| {
            let t = terms.as_ref()?;
            Some(QuotaReservation {
                owner: request.owner,
                id: raw.id,
                account: &raw.account,
                template_id: &t.template_id,
                month: request.month,
                day: request.day,
                monthly_limit: t.monthly_limit,
                daily_limit: t.daily_limit,
                now: request.now,
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

    fn row<'a>(
        id: i64,
        account: &'a str,
        template_id: &'a str,
        day: &'a str,
    ) -> QuotaReservation<'a> {
        QuotaReservation {
            owner: "me",
            id,
            account,
            template_id,
            month: "2026-11",
            day,
            monthly_limit: 10,
            daily_limit: 10,
            now: chrono::Utc::now(),
        }
    }

    #[test]
    fn counters_are_locked_once_each_accounts_sorted_days_before_months() {
        let items = [
            row(1, "b", "T2", "2026-11-30"),
            row(2, "a", "T9", "2026-11-30"),
            row(3, "a", "T1", "2026-11-30"),
            row(4, "a", "T1", "2026-11-29"),
            row(5, "b", "T2", "2026-11-30"),
        ];
        let keys = lock_order(&counter_pairs(&items, &[true; 5]));
        let keys: Vec<String> = keys
            .iter()
            .map(|k| format!("{} {} {}", k.account, k.scope, k.period))
            .collect();
        assert_eq!(
            keys,
            [
                "a account 2026-11-29",
                "a account 2026-11-30",
                "a template:T1 2026-11",
                "a template:T9 2026-11",
                "b account 2026-11-30",
                "b template:T2 2026-11",
            ]
        );
    }

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
