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
    let stdout = succeeded(&output);
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

/// `--api-url`: the daemons send to a stand-in outside the bench (here the project's own
/// simulator as a separate process, as the peer kit's nginx stub would be), and the run is
/// judged by the rows alone; `--daemons 2` starts two on the run's database.
#[test]
fn the_benchmark_drains_against_an_outside_stand_in() {
    let listen = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let mut simulator = Command::new(env!("CARGO_BIN_EXE_wechat-outbox"))
        .args(["simulate", "--listen", &listen])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("simulator starts");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(&listen).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "simulator not listening"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--backend", "both", "--drain", "300", "--rates", "0"])
        .args(["--api-url", &format!("http://{listen}"), "--daemons", "2"])
        .output()
        .expect("bench runs");
    let _ = simulator.kill();
    let _ = simulator.wait();
    let stdout = succeeded(&output);
    for backend in ["sqlite", "postgres"] {
        assert!(
            stdout.lines().any(|l| l.starts_with(backend)
                && l.contains("drain    n=300")
                && l.contains("host cpu")
                && l.contains("from the first sent")
                && l.contains("300 sent, 0 duplicate deliveries")
                && l.contains("[2 daemons")),
            "no {backend} drain line in:\n{stdout}"
        );
    }
    assert!(stdout.contains(&format!("WeChat: http://{listen}")));
    assert!(
        !stdout.contains("latency  rate="),
        "--rates 0 skips the latency runs"
    );
}

/// The bench's standard output, after checking that it exited well (else both its outputs).
fn succeeded(output: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}
