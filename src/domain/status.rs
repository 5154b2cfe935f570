//! The `status` column's values. See README "Statuses".

/// Where a row is in its life. Terminal statuses never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Waiting to be sent, including between retries.
    Pending,
    /// Claimed by a daemon that holds its lease.
    Sending,
    /// WeChat accepted it; `msgid` is known.
    Sent,
    /// A permanent errcode, a malformed row, or attempts exhausted.
    Failed,
    /// `expires_at` passed before it could be sent.
    Expired,
    /// An app cancelled it while it was pending.
    Cancelled,
    /// A request may have reached WeChat, and resending is no longer safe.
    Unknown,
    /// Waiting on a limit (room among templates in use, a quota period); not failed.
    Held,
    /// WeChat's delivery event said `success`.
    Delivered,
    /// The delivery event said the user blocks the account's messages.
    Blocked,
    /// The delivery event said any other failure.
    Undelivered,
}

impl Status {
    /// Every value the schema's `outbox_status_valid` CHECK admits.
    pub const ALL: [Status; 11] = [
        Status::Pending,
        Status::Sending,
        Status::Sent,
        Status::Failed,
        Status::Expired,
        Status::Cancelled,
        Status::Unknown,
        Status::Held,
        Status::Delivered,
        Status::Blocked,
        Status::Undelivered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Sending => "sending",
            Status::Sent => "sent",
            Status::Failed => "failed",
            Status::Expired => "expired",
            Status::Cancelled => "cancelled",
            Status::Unknown => "unknown",
            Status::Held => "held",
            Status::Delivered => "delivered",
            Status::Blocked => "blocked",
            Status::Undelivered => "undelivered",
        }
    }

    pub fn parse(text: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Whether the row never leaves this status: what retention may delete and what the
    /// reports count as done. `sent` counts, as a row whose delivery event never comes stays
    /// `sent`; the delivery event may still move it on to delivered, blocked or undelivered.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Status::Pending | Status::Sending | Status::Held)
    }

    /// The terminal statuses as an SQL list, `('sent', 'failed', …)`, for statements that
    /// select final rows.
    pub fn terminal_sql_list() -> String {
        let quoted: Vec<String> = Status::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
        format!("({})", quoted.join(", "))
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_round_trips_through_its_column_text() {
        for status in Status::ALL {
            assert_eq!(Status::parse(status.as_str()), Some(status));
        }
        assert_eq!(Status::parse("shipped"), None);
    }

    #[test]
    fn only_pending_sending_and_held_are_open() {
        let open: Vec<_> = Status::ALL
            .into_iter()
            .filter(|s| !s.is_terminal())
            .collect();
        assert_eq!(open, vec![Status::Pending, Status::Sending, Status::Held]);
    }

    #[test]
    fn the_terminal_list_names_every_final_status_and_no_other() {
        let list = Status::terminal_sql_list();
        for status in Status::ALL {
            assert_eq!(
                list.contains(&format!("'{status}'")),
                status.is_terminal(),
                "{status}"
            );
        }
    }
}
