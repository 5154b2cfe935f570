//! The overview's figures. Counting rows by status and the last day's sends reads the whole
//! table, so they are computed at most every `refresh_secs` and shared by every browser: a
//! page is answered from the last figures while newer ones are computed (and waits only for
//! the very first). A reading that takes long spaces the next one out to ten times its length,
//! so that a watched dashboard costs the database at most a tenth of one core however large the
//! table (1.5 s on SQLite at 1M rows: figures every 15 s).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::store::{ActivityCount, RowCount, Store, StoreResult, ViewRows};

/// Everything the overview shows, as of `at`.
pub struct Figures {
    pub at: DateTime<Utc>,
    pub counts: Vec<RowCount>,
    /// The last day, per minute.
    pub activity: Vec<ActivityCount>,
    pub quota: ViewRows,
    pub pauses: ViewRows,
    pub limits: ViewRows,
    pub templates_in_use: ViewRows,
    pub stuck: ViewRows,
    pub events: ViewRows,
}

/// Stuck rows the overview lists (the count is exact).
pub const STUCK_SHOWN: i64 = 20;

impl Figures {
    async fn read(store: &Store) -> StoreResult<Figures> {
        let now = Utc::now();
        let since = now - chrono::Duration::days(1);
        Ok(Figures {
            at: now,
            counts: store.shown_row_counts().await?,
            activity: store.activity_since(since).await?,
            quota: store
                .read_query(
                    "SELECT account, template_id, month_used, month_limit, month_remaining,
                            month_exhausted_on, day_used, day_limit, wechat_day_used,
                            wechat_day_limit
                     FROM report_quota ORDER BY account, template_id",
                    1_000,
                )
                .await?,
            pauses: store
                .read_query(
                    "SELECT account, paused_until, errcode, reason FROM account_pauses
                     ORDER BY account",
                    1_000,
                )
                .await?,
            limits: store
                .read_query(
                    "SELECT account, active_templates, daily_per_account, rate_per_second
                     FROM account_limits ORDER BY account",
                    1_000,
                )
                .await?,
            templates_in_use: store
                .read_query(
                    "SELECT account, COUNT(*) AS in_use FROM templates WHERE in_use
                     GROUP BY account ORDER BY account",
                    1_000,
                )
                .await?,
            stuck: store
                .read_query(
                    "SELECT id, account, template_id, status, why, since,
                            COUNT(*) OVER () AS total
                     FROM report_stuck ORDER BY since, id",
                    STUCK_SHOWN,
                )
                .await?,
            events: store
                .read_query(
                    "SELECT account, state, problem, event_count, last_received
                     FROM report_events WHERE state <> 'joined' ORDER BY account, state",
                    100,
                )
                .await?,
        })
    }
}

/// A reading of the figures may take this share of the time between readings, at most.
const READING_SHARE: u32 = 10;

/// The last figures, when they were read and how long that took.
pub struct Cache {
    every: Duration,
    last: Mutex<Option<(Instant, Arc<Figures>)>>,
    last_took: Mutex<Duration>,
    /// Since when readings have failed, and the last error: the page says its figures are old.
    failing: Mutex<Option<(DateTime<Utc>, String)>>,
    /// Held while figures are read: one reading at a time.
    reading: Arc<tokio::sync::Mutex<()>>,
}

impl Cache {
    pub fn new(every: Duration) -> Cache {
        Cache {
            every,
            last: Mutex::new(None),
            last_took: Mutex::new(Duration::ZERO),
            failing: Mutex::new(None),
            reading: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    fn last(&self) -> Option<(Instant, Arc<Figures>)> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The figures, read now if there are none or they are older than `every` and nobody is
    /// reading them already; otherwise the last ones while a reading runs in the background.
    pub async fn figures(self: &Arc<Self>, store: &Store) -> StoreResult<Arc<Figures>> {
        let took = *self.last_took.lock().unwrap_or_else(|p| p.into_inner());
        let every = self.every.max(took * READING_SHARE);
        match self.last() {
            Some((at, figures)) if at.elapsed() < every => Ok(figures),
            Some((_, figures)) => {
                if let Ok(reading) = self.reading.clone().try_lock_owned() {
                    let (cache, store) = (self.clone(), store.clone());
                    tokio::spawn(async move {
                        let _reading = reading;
                        let started = Instant::now();
                        match Figures::read(&store).await {
                            Ok(new) => {
                                cache.keep(new, started.elapsed());
                            }
                            Err(e) => {
                                let error =
                                    crate::domain::text::loggable_within(&e.to_string(), 300);
                                tracing::warn!(%error, "dashboard: cannot read the overview's figures");
                                let mut failing =
                                    cache.failing.lock().unwrap_or_else(|p| p.into_inner());
                                let since = failing.as_ref().map_or_else(Utc::now, |f| f.0);
                                *failing = Some((since, error));
                            }
                        }
                    });
                }
                Ok(figures)
            }
            None => {
                let _reading = self.reading.lock().await;
                if let Some((_, figures)) = self.last() {
                    return Ok(figures);
                }
                let started = Instant::now();
                let figures = Figures::read(store).await?;
                Ok(self.keep(figures, started.elapsed()))
            }
        }
    }

    /// Since when the figures could not be read, and why; `None` while they can.
    pub fn failing(&self) -> Option<(DateTime<Utc>, String)> {
        self.failing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn keep(&self, figures: Figures, took: Duration) -> Arc<Figures> {
        let figures = Arc::new(figures);
        *self.failing.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.last_took.lock().unwrap_or_else(|p| p.into_inner()) = took;
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), figures.clone()));
        figures
    }
}
