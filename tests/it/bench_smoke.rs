//! The benchmark still runs end to end (tiny sizes, both backends), so that the figures in
//! docs/benchmarks.md can be measured again from one command.

use std::process::Command;

#[test]
fn the_benchmark_runs_and_prints_its_figures() {
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--backend", "both", "--drain", "300", "--rates", "100"])
        .args([
            "--latency-secs",
            "1",
            "--slow-ms",
            "20",
            "--slow-rows",
            "300",
        ])
        .output()
        .expect("bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for backend in ["sqlite", "postgres"] {
        for run in [
            "drain    n=300",
            "latency  rate=100",
            "slow     n=300",
            "reached",
        ] {
            assert!(
                stdout
                    .lines()
                    .any(|l| l.starts_with(backend) && l.contains(run)),
                "no {backend} {run:?} line in:\n{stdout}"
            );
        }
    }
    assert!(stdout.contains("p99") && stdout.contains("peak rss") && stdout.contains("commits"));
}
