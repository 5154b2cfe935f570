//! `wechat-outbox report NAME`: prints one of the report views (docs/reports.md) as a table,
//! CSV or JSON.

use anyhow::{Result, bail};
use serde_json::{Map, Value};

use crate::domain::text::{cut, escape_control};
use crate::store::Store;

/// The widest a `table` cell prints; longer values are cut and marked `…` (csv and json
/// print every value whole).
pub const TABLE_CELL_CHARS: usize = 200;

/// The views, each with the order its rows are printed in.
pub const REPORTS: [(&str, &str); 9] = [
    ("report_status", "account, template_id, status"),
    ("report_quota", "account, template_id"),
    ("report_daily", "day DESC, account, template_id"),
    ("report_errors", "row_count DESC, errcode"),
    ("report_latency", "account, template_id"),
    ("report_stuck", "since, id"),
    ("report_events", "account, state, problem"),
    ("report_refusals", "account, template_id, refused_at DESC"),
    ("report_consents", "account, template_id, openid"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// A report's column names and rows, values as JSON.
pub type Report = crate::store::ViewRows;

/// Reads a report by its name, with or without the `report_` prefix.
pub async fn read(store: &Store, name: &str) -> Result<Report> {
    let view = if name.starts_with("report_") {
        name.to_string()
    } else {
        format!("report_{name}")
    };
    let Some((view, order)) = REPORTS.iter().find(|(v, _)| *v == view) else {
        let names: Vec<&str> = REPORTS
            .iter()
            .map(|(v, _)| v.trim_start_matches("report_"))
            .collect();
        bail!("no report {name:?}; the reports are: {}", names.join(", "));
    };
    Ok(store.read_view(view, order).await?)
}

pub fn render(report: &Report, format: Format) -> String {
    match format {
        Format::Json => {
            let objects: Vec<Value> = report
                .rows
                .iter()
                .map(|row| {
                    Value::Object(
                        report
                            .columns
                            .iter()
                            .cloned()
                            .zip(row.iter().cloned())
                            .collect::<Map<_, _>>(),
                    )
                })
                .collect();
            serde_json::to_string_pretty(&objects).expect("JSON values serialise")
        }
        Format::Csv => {
            let mut out = report.columns.join(",") + "\n";
            for row in &report.rows {
                let cells: Vec<String> = row.iter().map(|v| csv_cell(&text(v))).collect();
                out.push_str(&(cells.join(",") + "\n"));
            }
            out
        }
        Format::Table => {
            let cells: Vec<Vec<String>> = report
                .rows
                .iter()
                .map(|r| r.iter().map(|v| table_cell(&text(v))).collect())
                .collect();
            let widths: Vec<usize> = (0..report.columns.len())
                .map(|i| {
                    cells
                        .iter()
                        .map(|r| r[i].chars().count())
                        .chain([report.columns[i].len()])
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            // Padded by hand: `format!("{v:<w$}")` panics for a width above 65,535.
            let line = |values: Vec<&str>| {
                let mut out = String::new();
                for (i, (v, w)) in values.iter().zip(&widths).enumerate() {
                    if i > 0 {
                        out.push_str("  ");
                    }
                    out.push_str(v);
                    let pad = w.saturating_sub(v.chars().count());
                    out.extend(std::iter::repeat_n(' ', pad));
                }
                out.truncate(out.trim_end().len());
                out + "\n"
            };
            let header: Vec<String> = report.columns.iter().map(|c| table_cell(c)).collect();
            let mut out = line(header.iter().map(String::as_str).collect());
            for row in &cells {
                out.push_str(&line(row.iter().map(String::as_str).collect()));
            }
            out
        }
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.3}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// One value as a table shows it: control characters escaped (a value cannot start a line of
/// its own or drive the terminal), then cut to [`TABLE_CELL_CHARS`].
fn table_cell(text: &str) -> String {
    cut(&escape_control(text), TABLE_CELL_CHARS).into_owned()
}

fn csv_cell(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn report(rows: Vec<Vec<Value>>) -> Report {
        Report {
            columns: vec!["account".into(), "last_error".into(), "rows".into()],
            rows,
        }
    }

    #[test]
    fn a_cell_of_100_000_characters_prints_cut_in_a_table_and_whole_elsewhere() {
        let long = "长".repeat(100_000);
        let r = report(vec![
            vec![json!(long), json!("x"), json!(1)],
            vec![json!("default"), json!(long), json!(2)],
        ]);
        let table = render(&r, Format::Table);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        let cut = format!("{}…", "长".repeat(TABLE_CELL_CHARS));
        assert!(lines[1].starts_with(&format!("{cut}  x ")), "{}", lines[1]);
        assert!(
            lines[2].contains(&cut) && lines[2].ends_with(" 2"),
            "{}",
            lines[2]
        );
        assert!(
            lines
                .iter()
                .all(|l| l.chars().count() < 2 * TABLE_CELL_CHARS + 20)
        );

        let csv = render(&r, Format::Csv);
        assert!(csv.contains(&format!("{long},x,1")));
        let json: Vec<Value> = serde_json::from_str(&render(&r, Format::Json)).unwrap();
        assert_eq!(json[1]["last_error"], json!(long));
    }

    #[test]
    fn columns_line_up_on_characters() {
        let r = report(vec![
            vec![json!("a"), json!("您好"), json!(10)],
            vec![json!("bbbb"), json!(null), json!(2.5)],
        ]);
        assert_eq!(
            render(&r, Format::Table),
            "account  last_error  rows\n\
             a        您好          10\n\
             bbbb                 2.500\n"
        );
    }

    #[test]
    fn control_characters_cannot_forge_lines_or_escape_sequences_in_a_table() {
        let hostile = "x\ndefault  forged  999\r\u{1b}[2J\u{1b}[31mred\u{0}\u{7f}";
        let r = report(vec![vec![json!(hostile), json!("ok"), json!(1)]]);
        let table = render(&r, Format::Table);
        assert_eq!(table.lines().count(), 2, "{table}");
        assert!(!table.contains('\u{1b}') && !table.contains('\r') && !table.contains('\0'));
        assert!(
            table.contains("x\\ndefault  forged  999\\r\\u{1b}[2J"),
            "{table}"
        );
        // csv quotes it, json escapes it: both keep the value exact.
        let csv = render(&r, Format::Csv);
        assert!(
            csv.starts_with("account,last_error,rows\n\"x\ndefault"),
            "{csv}"
        );
        let json: Vec<Value> = serde_json::from_str(&render(&r, Format::Json)).unwrap();
        assert_eq!(json[0]["account"], json!(hostile));
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_support::cases(64))]

        /// Any values, any length: every format renders without panic, a table has one line
        /// per row with no control character, and csv/json keep values whole.
        #[test]
        fn any_cells_render_in_every_format(
            cells in proptest::collection::vec(proptest::prelude::any::<String>(), 0..12),
            wide in 0usize..70_000,
        ) {
            let mut cells = cells;
            cells.push("w".repeat(wide));
            let rows: Vec<Vec<Value>> = cells
                .chunks(3)
                .filter(|c| c.len() == 3)
                .map(|c| c.iter().map(|s| json!(s)).collect())
                .collect();
            let r = report(rows.clone());
            let table = render(&r, Format::Table);
            proptest::prop_assert_eq!(table.matches('\n').count(), rows.len() + 1);
            proptest::prop_assert!(!table.chars().any(|c| c.is_control() && c != '\n'));
            let json: Vec<Value> = serde_json::from_str(&render(&r, Format::Json)).unwrap();
            proptest::prop_assert_eq!(json.len(), rows.len());
            let csv = render(&r, Format::Csv);
            for row in &rows {
                for v in row {
                    proptest::prop_assert!(csv.contains(&csv_cell(v.as_str().unwrap())));
                }
            }
        }
    }
}
