//! The side-by-side mode (`--peer`): graphile-worker, run by the peer kit (`../shared/peers`),
//! and the daemon, alternately, against the same stubs of WeChat, on the same machine.
//! Only these ratios compare across machines; docs/benchmarks.md.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::run::{Run, StandIn};
use crate::{Args, Backend};

/// The kit's fast stub (nginx) and slow one (every send answered after 50 ms).
const FAST_STUB: &str = "http://127.0.0.1:9980";
const SLOW_STUB: &str = "http://127.0.0.1:9981";
/// The slow stub's delay (`STUB_DELAY_S` in the kit).
const SLOW_STUB_MS: f64 = 50.0;

/// The peer kit, installed (its `setup.sh` copies it to a writable folder), with its stubs up.
struct Kit {
    source: PathBuf,
    installed: PathBuf,
    started_stubs: bool,
}

impl Kit {
    fn prepare(source: &Path) -> Result<Kit> {
        let setup = source.join("setup.sh");
        let out = Command::new("bash")
            .arg(&setup)
            .output()
            .with_context(|| format!("running {}", setup.display()))?;
        if !out.status.success() {
            bail!(
                "{} failed: {}",
                setup.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let installed = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .context("setup.sh printed no folder")?
            .trim()
            .into();
        let mut kit = Kit {
            source: source.into(),
            installed,
            started_stubs: false,
        };
        if !answering(FAST_STUB) {
            let start = kit.installed.join("stub/start.sh");
            let status = Command::new("bash").arg(&start).status()?;
            if !status.success() || !answering(FAST_STUB) {
                bail!("{} did not start the stubs", start.display());
            }
            kit.started_stubs = true;
        }
        Ok(kit)
    }

    /// One run of the kit (`run.sh MODE … --runs 1`); its output passes through, and the
    /// figures come from the line it appends to `results-raw/MODE.jsonl`.
    fn run_once(&self, mode: &str, args: &[String]) -> Result<Value> {
        let status = Command::new("bash")
            .arg(self.source.join("run.sh"))
            .arg(mode)
            .args(["--runs", "1"])
            .args(args)
            .status()?;
        if !status.success() {
            bail!("the peer kit's {mode} run failed");
        }
        let raw = self.installed.join(format!("results-raw/{mode}.jsonl"));
        let text = std::fs::read_to_string(&raw)?;
        let last = text.lines().last().context("no result line")?;
        Ok(serde_json::from_str(last)?)
    }
}

impl Drop for Kit {
    fn drop(&mut self) {
        if self.started_stubs {
            let _ = Command::new("bash")
                .arg(self.installed.join("stub/stop.sh"))
                .status();
        }
    }
}

fn answering(base: &str) -> bool {
    Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-X", "POST"])
        .arg(format!("{base}/cgi-bin/stable_token"))
        .status()
        .is_ok_and(|s| s.success())
}

fn number(v: &Value, key: &str) -> Result<f64> {
    v[key]
        .as_f64()
        .with_context(|| format!("{key} missing from the kit's result"))
}

/// Figures of one system over the rounds.
#[derive(Default)]
struct Series {
    rate: Vec<f64>,
    host_cpu_ms: Vec<f64>,
}

fn median(xs: &[f64]) -> f64 {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

fn range(xs: &[f64]) -> (f64, f64) {
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

pub async fn side_by_side(args: &Args, backends: &[Backend]) -> Result<()> {
    let kit = Kit::prepare(&args.peer_kit)?;
    let conc = format!("CONC={}", args.concurrency);
    let peer_settings = [conc.clone(), "LQ=500".into(), "CJBD=0".into()];
    println!(
        "peer: graphile-worker by {} ({}), {}; alternated with the daemon, {} rounds",
        kit.source.display(),
        kit.installed.display(),
        peer_settings.join(" "),
        args.runs
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;

    let mut drains = vec![(FAST_STUB, "fast", args.drain.clone())];
    if args.slow_ms > 0 {
        drains.push((SLOW_STUB, "slow", vec![args.slow_rows]));
    }
    for (url, stub, sizes) in drains {
        for n in sizes {
            let mut peer = Series::default();
            let mut ours: Vec<Series> = backends.iter().map(|_| Series::default()).collect();
            for round in 1..=args.runs {
                println!("-- {stub} stub, n={n}, round {round} of {}", args.runs);
                let mut kit_args = vec!["--stub".into(), stub.into(), "--n".into(), n.to_string()];
                kit_args.extend(peer_settings.iter().cloned());
                let r = kit.run_once("drain", &kit_args)?;
                peer.rate.push(number(&r, "jobs_per_s_from_first")?);
                // The kit reports the host's busy share from the worker's spawn to the end.
                let busy_cpu_secs =
                    number(&r, "host_cpu_busy")? * number(&r, "spawn_to_done_s")? * cpus;
                peer.host_cpu_ms.push(1000.0 * busy_cpu_secs / n as f64);
                for (backend, series) in backends.iter().zip(&mut ours) {
                    let run = Run::new(args, *backend, StandIn::External(url.into())).await?;
                    let drained = run.drain(n, stub).await?;
                    series.rate.push(drained.from_first);
                    series.host_cpu_ms.push(drained.host_cpu_ms);
                }
            }
            let base = median(&peer.rate);
            let line = |name: &str, s: &Series| {
                let (lo, hi) = range(&s.rate);
                println!(
                    "SUMMARY {stub:<4} n={n:<7} {name:<16} median {:>7.0} [{lo:.0}-{hi:.0}] msg/s  {:.2}x the peer  host cpu {:.3} ms/msg",
                    median(&s.rate),
                    median(&s.rate) / base,
                    median(&s.host_cpu_ms),
                );
            };
            line("graphile-worker", &peer);
            for (backend, series) in backends.iter().zip(&ours) {
                line(backend.name(), series);
            }
            if stub == "slow" {
                let bound = args.concurrency as f64 / (SLOW_STUB_MS / 1000.0);
                println!(
                    "SUMMARY slow bound concurrency/latency = {bound:.0} msg/s: graphile-worker {:.1}%{}",
                    100.0 * base / bound,
                    backends
                        .iter()
                        .zip(&ours)
                        .map(|(b, s)| format!(
                            ", {} {:.1}%",
                            b.name(),
                            100.0 * median(&s.rate) / bound
                        ))
                        .collect::<String>()
                );
            }
        }
    }

    for &rate in args.rates.iter().filter(|&&rate| rate > 0) {
        let n = rate * args.latency_secs;
        let mut peer = (Vec::new(), Vec::new());
        let mut ours: Vec<(Vec<f64>, Vec<f64>)> =
            backends.iter().map(|_| (Vec::new(), Vec::new())).collect();
        for round in 1..=args.runs {
            println!("-- latency at {rate}/s, round {round} of {}", args.runs);
            let mut kit_args = vec![
                "--n".into(),
                n.to_string(),
                "--gap-ms".into(),
                format!("{}", 1000.0 / rate as f64),
            ];
            kit_args.extend(peer_settings.iter().cloned());
            let r = kit.run_once("latency", &kit_args)?;
            peer.0.push(number(&r, "end_p50")?);
            peer.1.push(number(&r, "end_p99")?);
            for (backend, series) in backends.iter().zip(&mut ours) {
                let run = Run::new(args, *backend, StandIn::External(FAST_STUB.into())).await?;
                let (p50, p99) = run.latency(rate, args.latency_secs).await?;
                series.0.push(p50);
                series.1.push(p99);
            }
        }
        println!(
            "SUMMARY latency {rate}/s graphile-worker insert->done p50 {:.2} ms p99 {:.2} ms (medians over rounds)",
            median(&peer.0),
            median(&peer.1)
        );
        for (backend, (p50, p99)) in backends.iter().zip(&ours) {
            println!(
                "SUMMARY latency {rate}/s {:<15} insert->sent p50 {:.2} ms p99 {:.2} ms",
                backend.name(),
                median(p50),
                median(p99)
            );
        }
    }
    Ok(())
}
