//! Times as each backend stores them, behind one type so that one statement binds and reads
//! them on both: `timestamptz` on Postgres, UTC text `YYYY-MM-DD HH:MM:SS.SSS` on SQLite (the
//! form the SQLite schema compares as text; see its first migration).
//!
//! Reading is checked on both: a value an app forced into a time column (`infinity`, year
//! 270000, text that is not a time) is a decode error, which `RowReader` turns into a reason
//! on that row, never a panic.

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueFormat, PgValueRef};
use sqlx::sqlite::{SqliteArgumentsBuffer, SqliteTypeInfo, SqliteValueRef};
use sqlx::{Decode, Encode, Postgres, Sqlite, Type};

/// A UTC time as a statement binds or reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Time(pub DateTime<Utc>);

impl From<DateTime<Utc>> for Time {
    fn from(time: DateTime<Utc>) -> Self {
        Time(time)
    }
}

impl From<Time> for DateTime<Utc> {
    fn from(time: Time) -> Self {
        time.0
    }
}

const TIME_FORMAT: &str = "%Y-%m-%d %H:%M:%S%.3f";

/// A time in the text form the SQLite schema stores and compares.
pub fn ts(time: DateTime<Utc>) -> String {
    time.format(TIME_FORMAT).to_string()
}

/// Reads a time stored as SQLite text; `None` for anything else.
pub fn parse_ts(text: &str) -> Option<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc())
}

impl Type<Sqlite> for Time {
    fn type_info() -> SqliteTypeInfo {
        <String as Type<Sqlite>>::type_info()
    }

    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <String as Type<Sqlite>>::compatible(ty)
    }
}

impl Encode<'_, Sqlite> for Time {
    fn encode_by_ref(&self, buf: &mut SqliteArgumentsBuffer) -> Result<IsNull, BoxDynError> {
        <String as Encode<Sqlite>>::encode(ts(self.0), buf)
    }
}

impl<'r> Decode<'r, Sqlite> for Time {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        let text = <&str as Decode<Sqlite>>::decode(value)?;
        parse_ts(text)
            .map(Time)
            .ok_or_else(|| "not a time in the form YYYY-MM-DD HH:MM:SS".into())
    }
}

impl Type<Postgres> for Time {
    fn type_info() -> PgTypeInfo {
        <DateTime<Utc> as Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <DateTime<Utc> as Type<Postgres>>::compatible(ty)
    }
}

impl sqlx::postgres::PgHasArrayType for Time {
    fn array_type_info() -> PgTypeInfo {
        <DateTime<Utc> as sqlx::postgres::PgHasArrayType>::array_type_info()
    }
}

impl Encode<'_, Postgres> for Time {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        <DateTime<Utc> as Encode<Postgres>>::encode_by_ref(&self.0, buf)
    }
}

/// Checked arithmetic: sqlx adds the microseconds to its epoch unchecked, which panics on
/// `infinity` or a year past chrono's 262142 (one app's row then crash-looped the daemon).
impl<'r> Decode<'r, Postgres> for Time {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        match value.format() {
            PgValueFormat::Binary => {
                // Microseconds since 2000-01-01 UTC; infinity is i64::MAX, -infinity i64::MIN.
                let micros: i64 = Decode::<Postgres>::decode(value)?;
                let epoch = DateTime::<Utc>::from_timestamp(946_684_800, 0).expect("in range");
                epoch
                    .checked_add_signed(chrono::TimeDelta::microseconds(micros))
                    .filter(|_| micros != i64::MAX && micros != i64::MIN)
                    .map(Time)
                    .ok_or_else(|| {
                        "a time outside the range the daemon can read (infinity?)".into()
                    })
            }
            // Text is parsed by chrono, which reports an error rather than panicking.
            PgValueFormat::Text => Ok(Time(Decode::<Postgres>::decode(value)?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_text_round_trips_to_the_millisecond() {
        let time = DateTime::parse_from_rfc3339("2026-12-02T19:45:58.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        let text = ts(time);
        assert_eq!(text, "2026-12-02 19:45:58.123");
        let read = parse_ts(&text).unwrap();
        assert_eq!(read.timestamp_millis(), time.timestamp_millis());
        assert_eq!(parse_ts("tomorrow"), None);
    }
}
