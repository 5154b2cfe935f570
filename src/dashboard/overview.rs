//! The overview's figures. Counting rows by status and the last day's sends reads the whole
//! table, so they are computed at most every `refresh_secs` and shared by every browser: a
//! page is answered from the last figures while newer ones are computed (and waits only for
//! the very first). A reading that takes long spaces the next one out to ten times its length,
//! so that a watched dashboard costs the database at most a tenth of one core however large the
//! table (1.5 s on SQLite at 1M rows: figures every 15 s).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::store::{ActivityCount, DashboardTable, RowCount, Store, StoreResult, ViewRows};

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

impl Figures {
    async fn read(store: &Store) -> StoreResult<Figures> {
        let now = Utc::now();
        let since = now - chrono::Duration::days(1);
        Ok(Figures {
            at: now,
            counts: store.row_counts().await?,
            activity: store.activity_since(since).await?,
            quota: store
                .dashboard_table(DashboardTable::QuotaThisMonth)
                .await?,
            pauses: store.dashboard_table(DashboardTable::Pauses).await?,
            limits: store.dashboard_table(DashboardTable::AccountLimits).await?,
            templates_in_use: store
                .dashboard_table(DashboardTable::TemplatesInUse)
                .await?,
            stuck: store.dashboard_table(DashboardTable::Stuck).await?,
            events: store
                .dashboard_table(DashboardTable::UnjoinedEvents)
                .await?,
        })
    }
}

/// A reading of the figures may take this share of the time between readings, at most.
const READING_SHARE: u32 = 10;

/// The last figures, and when and how long the last reading was.
pub struct Cache {
    every: Duration,
    last: Mutex<Option<Arc<Figures>>>,
    /// When the last reading began (successful or not) and how long it took.
    last_reading: Mutex<(Option<Instant>, Duration)>,
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
            last_reading: Mutex::new((None, Duration::ZERO)),
            failing: Mutex::new(None),
            reading: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    fn last(&self) -> Option<Arc<Figures>> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The figures, read now if there are none or they are older than `every` and nobody is
    /// reading them already; otherwise the last ones while a reading runs in the background.
    /// A reading that fails counts as one for the spacing: failures are not retried on every
    /// request.
    pub async fn figures(self: &Arc<Self>, store: &Store) -> StoreResult<Arc<Figures>> {
        match self.last() {
            Some(figures) if !self.due() => Ok(figures),
            Some(figures) => {
                if let Ok(reading) = self.reading.clone().try_lock_owned() {
                    let (cache, store) = (self.clone(), store.clone());
                    tokio::spawn(async move {
                        let _reading = reading;
                        let _ = cache.read(&store).await;
                    });
                }
                Ok(figures)
            }
            None => {
                let _reading = self.reading.lock().await;
                if let Some(figures) = self.last() {
                    return Ok(figures);
                }
                if !self.due()
                    && let Some((_, error)) = self.failing()
                {
                    return Err(sqlx::Error::Protocol(error));
                }
                self.read(store).await
            }
        }
    }

    /// Whether the spacing since the last reading (success or failure) has passed.
    fn due(&self) -> bool {
        let (at, took) = *self.last_reading.lock().unwrap_or_else(|p| p.into_inner());
        let every = self.every.max(took * READING_SHARE);
        at.is_none_or(|at| at.elapsed() >= every)
    }

    /// Reads the figures and keeps them, or records the failure.
    async fn read(&self, store: &Store) -> StoreResult<Arc<Figures>> {
        let started = Instant::now();
        let read = Figures::read(store).await;
        *self.last_reading.lock().unwrap_or_else(|p| p.into_inner()) =
            (Some(started), started.elapsed());
        match read {
            Ok(figures) => {
                let figures = Arc::new(figures);
                *self.failing.lock().unwrap_or_else(|p| p.into_inner()) = None;
                *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(figures.clone());
                Ok(figures)
            }
            Err(e) => {
                let error = crate::domain::text::loggable_within(&e.to_string(), 300);
                tracing::warn!(%error, "dashboard: cannot read the overview's figures");
                let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
                let since = failing.as_ref().map_or_else(Utc::now, |f| f.0);
                *failing = Some((since, error));
                Err(e)
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
}
