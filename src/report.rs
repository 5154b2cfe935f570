//! `wechat-outbox report NAME`: prints one of the report views (docs/reports.md) as a table,
//! CSV or JSON.

use anyhow::{Result, bail};
use serde_json::{Map, Value};

use crate::store::Store;

/// The views, each with the order its rows are printed in.
pub const REPORTS: [(&str, &str); 6] = [
    ("report_status", "account, template_id, status"),
    ("report_quota", "account, template_id"),
    ("report_daily", "day DESC, account, template_id"),
    ("report_errors", "row_count DESC, errcode"),
    ("report_latency", "account, template_id"),
    ("report_stuck", "since, id"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// A report's column names and rows, values as JSON.
pub struct Report {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

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
                .map(|r| r.iter().map(text).collect())
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
            let line = |values: Vec<&str>| {
                let padded: Vec<String> = values
                    .iter()
                    .zip(&widths)
                    .map(|(v, w)| format!("{v:<w$}"))
                    .collect();
                padded.join("  ").trim_end().to_string() + "\n"
            };
            let mut out = line(report.columns.iter().map(String::as_str).collect());
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

fn csv_cell(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}
