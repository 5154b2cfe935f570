//! A cheap look at whether a SQLite database in WAL mode has changed: the first header of its
//! WAL index (the `-shm` file every connection maps) changes with each commit and checkpoint
//! (<https://sqlite.org/walformat.html>). Reading it is one 48-byte read from the page cache,
//! so the watcher can look every few milliseconds while costing nothing measurable idle, and
//! asks the database itself only after a change.

use std::fs::File;
use std::io;
use std::path::Path;

/// The WAL index header's size; two copies follow each other, the first is read.
const HEADER_LEN: usize = 48;

pub struct WalIndex {
    file: File,
    last: Option<[u8; HEADER_LEN]>,
}

impl WalIndex {
    /// Opens the WAL index of the database file at `database`.
    pub fn open(database: &Path) -> io::Result<WalIndex> {
        let mut name = database.as_os_str().to_os_string();
        name.push("-shm");
        Ok(WalIndex {
            file: File::open(name)?,
            last: None,
        })
    }

    /// True if the header differs from the last read (or could not be read whole, which a
    /// change may cause); the first call is always true.
    pub fn changed(&mut self) -> io::Result<bool> {
        let mut header = [0u8; HEADER_LEN];
        if read_at(&self.file, &mut header)? < HEADER_LEN {
            return Ok(true);
        }
        let changed = self.last != Some(header);
        self.last = Some(header);
        Ok(changed)
    }
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8]) -> io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(file, buf, 0)
}

#[cfg(not(unix))]
fn read_at(_file: &File, _buf: &mut [u8]) -> io::Result<usize> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "positioned reads",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
    use sqlx::{ConnectOptions, Executor};

    #[tokio::test]
    async fn a_commit_by_another_connection_changes_the_header_and_a_read_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("watched.db");
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        let mut writer = options.connect().await.unwrap();
        writer.execute("CREATE TABLE t (x)").await.unwrap();
        let mut index = WalIndex::open(&path).unwrap();
        assert!(index.changed().unwrap(), "the first look");
        assert!(!index.changed().unwrap(), "nothing happened");

        writer.execute("SELECT * FROM t").await.unwrap();
        assert!(!index.changed().unwrap(), "a read is not a change");
        writer.execute("INSERT INTO t VALUES (1)").await.unwrap();
        assert!(index.changed().unwrap(), "a commit is");
        assert!(!index.changed().unwrap());
    }
}
