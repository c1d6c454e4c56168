//! `evbus-bench report`: docs/benchmarks.md and its SVG chart, from the JSON of a run and of
//! the callgrind figures.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use crate::Result;
use crate::measure::{
    AdapterResult, Comparison, RunResult, Stat, script_line, size_label, verdict_of,
};
use crate::sample::SIZES;

/// What the page carries besides the runs of the loops, each optional.
pub(crate) struct Extras<'a> {
    /// The callgrind figures' JSON.
    pub(crate) callgrind: Option<&'a Path>,
    /// Hand-written analysis, included verbatim at the end.
    pub(crate) notes: Option<&'a Path>,
    /// The `bench gateway ...` lines of the last full gateway run, after a `# date command`
    /// line.
    pub(crate) gateway: Option<&'a Path>,
}

/// Writes the markdown and the chart.
pub(crate) fn write(
    runs: &[std::path::PathBuf],
    not_run: &[String],
    extras: Extras<'_>,
    docs: &Path,
    svg: &Path,
) -> Result<()> {
    let Extras {
        callgrind,
        notes,
        gateway,
    } = extras;
    let mut merged: Option<RunResult> = None;
    // The latest start among the runs: its end load is the whole run's.
    let mut last_started = String::new();
    for path in runs {
        let mut one: RunResult = serde_json::from_str(&std::fs::read_to_string(path)?)?;
        for adapter in &mut one.adapters {
            adapter.measured = Some(one.environment.clone());
        }
        let started = one.environment.started.clone();
        match &mut merged {
            None => {
                last_started = started;
                merged = Some(one);
            }
            Some(m) => {
                // Files come in name order, not run order: the page's date and start load
                // are the first adapter's to run (RFC 3339 UTC sorts as text), its end load
                // the last one's.
                // Peer runs (given after the loops' runs) keep their own times out of it.
                let peer = one.adapters.iter().any(|a| a.baseline != "raw");
                let env = &mut m.environment;
                if !peer && started < env.started {
                    env.started = started.clone();
                    env.load_start = one.environment.load_start.clone();
                }
                if !peer && started > last_started {
                    env.load_end = one.environment.load_end.clone();
                    last_started = started;
                }
                m.adapters.extend(one.adapters);
                m.not_run.extend(one.not_run);
                m.environment.brokers.extend(one.environment.brokers);
                m.quick |= one.quick;
            }
        }
    }
    let mut run = merged.ok_or("no run to report")?;
    // Peer runs (`--peers`) get their own section, not an adapter's.
    let (peers, adapters): (Vec<AdapterResult>, Vec<AdapterResult>) =
        std::mem::take(&mut run.adapters)
            .into_iter()
            .partition(|a| a.baseline != "raw");
    run.adapters = adapters;
    for line in not_run {
        if let Some((name, why)) = line.split_once('=') {
            run.not_run.insert(name.to_owned(), why.to_owned());
        }
    }
    let callgrind: Option<Value> = match callgrind {
        Some(p) if p.exists() => Some(serde_json::from_str(&std::fs::read_to_string(p)?)?),
        _ => None,
    };
    let notes = match notes {
        Some(p) if p.exists() => Some(std::fs::read_to_string(p)?),
        _ => None,
    };
    let gateway = match gateway {
        Some(p) if p.exists() => Some(std::fs::read_to_string(p)?),
        _ => None,
    };
    std::fs::write(svg, chart(&run.adapters))?;
    let svg_name = svg
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::fs::write(
        docs,
        markdown(
            &run,
            &peers,
            callgrind.as_ref(),
            gateway.as_deref(),
            notes.as_deref(),
            &svg_name,
        ),
    )?;
    eprintln!("bench: wrote {} and {}", docs.display(), svg.display());
    Ok(())
}

fn rate(x: f64) -> String {
    if !x.is_finite() {
        "–".to_owned()
    } else {
        let s = format!("{x:.0}");
        // Thousands separators.
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    }
}

fn us(x: f64) -> String {
    if !x.is_finite() {
        "–".to_owned()
    } else if x >= 1000.0 {
        format!("{:.2} ms", x / 1000.0)
    } else {
        format!("{x:.0} µs")
    }
}

fn bmw(s: &Stat, f: fn(f64) -> String) -> String {
    format!("{} / **{}** / {}", f(s.best), f(s.median), f(s.worst))
}

fn verdict(c: &Comparison) -> String {
    // Recomputed, so that a report of older results follows today's rule.
    let verdict = verdict_of(&c.raw, &c.bus);
    let mut v = if verdict == "indistinguishable" {
        "indistinguishable".to_owned()
    } else {
        format!("{verdict} ({:+.0}%)", (c.ratio - 1.0) * 100.0)
    };
    if c.broker_bound {
        v.push_str(", broker-bound");
    }
    v
}

fn markdown(
    run: &RunResult,
    peers: &[AdapterResult],
    callgrind: Option<&Value>,
    gateway: Option<&str>,
    notes: Option<&str>,
    svg: &str,
) -> String {
    let env = &run.environment;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Benchmarks\n\n\
         <!-- Generated by `cargo xtask bench` (evbus-bench report); edit benches/notes.md, \
         not this file. -->\n\n\
         evbus measured against each broker's raw client, in one run on one machine: \
         ratios, not absolute numbers, are what carries over to another machine. Method: \
         [issue 7 / DESIGN §6](../benches/README.md) — three loops per adapter that differ \
         only in what carries the events (the raw client; the evbus adapter alone; the full \
         Bus with validation on both sides), the same payload bytes from one generator \
         decoded into the same Rust type (`black_box`), one tokio runtime, interleaved \
         rounds after a discarded calibration run, fresh destinations per run.\n\n\
         Each cell is **best / median / worst** round. A difference between the Bus and raw \
         medians smaller than the larger best-to-worst spread of the two loops (both as \
         ratios) is reported as *indistinguishable*; \
         *broker-bound* means the raw loop spent more than half its time waiting on the \
         broker.\n"
    );
    if run.quick {
        let _ = writeln!(
            md,
            "> This is a `--quick` run: few events and rounds, wide spreads.\n"
        );
    }
    // The adapters' rows may come from runs made at different times (each adapter keeps its
    // last full run): then the page gives the span here and each run in its section.
    let starts: std::collections::BTreeSet<&str> = run
        .adapters
        .iter()
        .filter_map(|a| a.measured.as_ref().map(|m| m.started.as_str()))
        .collect();
    let several = starts.len() > 1;
    let _ = writeln!(md, "## Environment\n");
    let _ = writeln!(md, "| | |\n|---|---|");
    match (starts.first(), starts.last()) {
        (Some(first), Some(last)) if several => {
            let _ = writeln!(
                md,
                "| date | {first} to {last}: each adapter's last full run, given in its section |"
            );
        }
        _ => {
            let _ = writeln!(md, "| date | {} |", env.started);
        }
    }
    let others = run
        .adapters
        .iter()
        .filter_map(|a| a.measured.as_ref())
        .any(|m| m.cpu != env.cpu);
    let _ = writeln!(
        md,
        "| CPU | {} ({} cores){} |",
        env.cpu,
        env.cores,
        if others {
            "; the runs made on another machine name theirs in their section"
        } else {
            ""
        }
    );
    let _ = writeln!(md, "| kernel | {} |", env.kernel);
    // The 1-minute load against the cores: above them, other work competed with the run.
    let busy = [&env.load_start, &env.load_end]
        .iter()
        .any(|l| is_busy(l, env.cores));
    if several {
        let _ = writeln!(
            md,
            "| load (`/proc/loadavg`) | per run, in each adapter's section (the brokers \
             measured share the same cores) |"
        );
    } else {
        let _ = writeln!(
            md,
            "| load (`/proc/loadavg`) | start `{}`, end `{}`{} |",
            env.load_start,
            env.load_end,
            load_note(busy)
        );
    }
    if !env.commit.is_empty() && !several {
        let _ = writeln!(md, "| commit | `{}` |", env.commit);
    }
    let _ = writeln!(md, "| rustc | {} |", env.rustc);
    let _ = writeln!(md, "| profile, flags | {}; {} |", env.profile, env.flags);
    let _ = writeln!(md, "| runtime | {} |", env.runtime);
    let crates: Vec<String> = env.crates.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(md, "| crates | {} |", crates.join(", "));
    for (name, how) in &env.brokers {
        let _ = writeln!(md, "| broker: {name} | {} |", how.replace('|', "\\|"));
    }
    for (name, why) in &run.not_run {
        let _ = writeln!(md, "| not run: {name} | {why} |");
    }
    let _ = writeln!(md);

    let _ = writeln!(
        md,
        "## Throughput\n\n![throughput by payload size]({svg})\n"
    );
    for a in &run.adapters {
        adapter_section(&mut md, a, env);
    }

    let _ = writeln!(md, "## The lines scripts read\n\n```text");
    for a in &run.adapters {
        for s in &a.sizes {
            let _ = writeln!(
                md,
                "{}",
                script_line(&a.name, "publish", s.size, &s.publish)
            );
            for (what, c) in s.bursts() {
                let _ = writeln!(md, "{}", script_line(&a.name, what, s.size, c));
            }
            let _ = writeln!(
                md,
                "{}",
                script_line(&a.name, "consume", s.size, &s.consume)
            );
        }
    }
    for (name, why) in &run.not_run {
        let _ = writeln!(md, "bench {name}: not run ({why})");
    }
    let _ = writeln!(md, "```\n");

    peers_section(&mut md, peers, &run.adapters, env);
    gateway_section(&mut md, gateway);

    let _ = writeln!(md, "## Cost of the code per event (callgrind, in-memory)\n");
    match callgrind {
        Some(cg) => callgrind_section(&mut md, cg),
        None => {
            let _ = writeln!(
                md,
                "Not measured in this run (`cargo xtask bench --callgrind`).\n"
            );
        }
    }
    if let Some(notes) = notes {
        let _ = writeln!(md, "{}", notes.trim_end());
    }
    md
}

/// Watermill's published figures (its benchmark page, 16 vCPU), publish and subscribe
/// messages/s, for the brokers evbus also carries.
const WATERMILL: &[(&str, &str, u32, u32)] = &[
    ("redis", "Redis Streams", 61_642, 11_213),
    ("kafka", "Kafka", 44_090, 108_285),
    ("nats", "NATS JetStream", 49_255, 33_009),
    ("amqp", "RabbitMQ (AMQP)", 2_702, 13_192),
];

/// The gateway under load (`cargo xtask bench --gateway`): its last full run's lines as a
/// table, and verbatim.
fn gateway_section(md: &mut String, lines: Option<&str>) {
    let _ = writeln!(md, "## The gateway under load\n");
    let Some(lines) = lines else {
        let _ = writeln!(
            md,
            "No gateway run in this report (`cargo xtask bench --gateway`).\n"
        );
        return;
    };
    let mut when = "";
    let mut rows = Vec::new();
    for line in lines.lines() {
        if let Some(header) = line.strip_prefix("# ") {
            when = header.split_whitespace().next().unwrap_or("");
        } else if line.starts_with("bench gateway ") {
            rows.push(line);
        }
    }
    let _ = writeln!(
        md,
        "Measured {when} by `cargo xtask bench --gateway`, a separate run from the loops \
         above, on the same machine: the gateway (`Gateway::serve`, SQLite store, memory \
         transport), a bare axum handler doing the same I/O, and the load, in one process on \
         one runtime. Ratio: evbus over bare. What each side does: \
         [benches/README.md](../benches/README.md#the-gateway-under-load).\n"
    );
    let _ = writeln!(
        md,
        "| measure | evbus | bare handler | ratio | |\n|---|---|---|---|---|"
    );
    for row in &rows {
        match gateway_row(row) {
            Some([measure, evbus, bare, ratio, rest]) => {
                let _ = writeln!(md, "| {measure} | {evbus} | {bare} | {ratio} | {rest} |");
            }
            None => {
                let _ = writeln!(md, "| {} | | | | |", row.replace('|', "\\|"));
            }
        }
    }
    let _ = writeln!(md, "\n```text");
    for row in &rows {
        let _ = writeln!(md, "{row}");
    }
    let _ = writeln!(md, "```\n");
}

/// `bench gateway NAME: evbus A bare B ratio R REST` as its five parts.
fn gateway_row(line: &str) -> Option<[&str; 5]> {
    let rest = line.strip_prefix("bench gateway ")?;
    let (measure, rest) = rest.split_once(": evbus ")?;
    let (evbus, rest) = rest.split_once(" bare ")?;
    let (bare, rest) = rest.split_once(" ratio ")?;
    let (ratio, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    Some([measure, evbus, bare, ratio, rest.trim()])
}

fn peers_section(
    md: &mut String,
    peers: &[AdapterResult],
    adapters: &[AdapterResult],
    page: &crate::env::Environment,
) {
    let _ = writeln!(md, "## Against the peers\n");
    if peers.is_empty() {
        let _ = writeln!(
            md,
            "No peer run in this report (`cargo xtask bench --peers`).\n"
        );
    }
    for a in peers {
        let _ = writeln!(
            md,
            "### {} against {} on the same broker\n\n{} events per throughput run ({} per \
             publish-c64 and publish-batch run), {} rounds, interleaved with the evbus loops.\n",
            a.name, a.baseline, a.plan.events, a.plan.burst_events, a.plan.rounds
        );
        run_line(md, a, page);
        let _ = writeln!(
            md,
            "| size | measure | {} (events/s) | evbus adapter | evbus Bus | Bus/{} | adapter/{} |\n\
             |---|---|---|---|---|---|---|",
            a.baseline, a.baseline, a.baseline
        );
        for s in &a.sizes {
            for (what, c) in s.measures() {
                let _ = writeln!(
                    md,
                    "| {} | {what} | {} | {} | {} | {:.2} | {:.2} |",
                    size_label(s.size),
                    bmw(&c.raw, rate),
                    bmw(&c.adapter, rate),
                    bmw(&c.bus, rate),
                    c.ratio,
                    c.adapter_ratio
                );
            }
        }
        let _ = writeln!(md, "\n```text");
        for s in &a.sizes {
            for (what, c) in s.measures() {
                for line in crate::measure::peer_lines(&a.name, &a.baseline, what, s.size, c) {
                    let _ = writeln!(md, "{line}");
                }
            }
        }
        let _ = writeln!(md, "```\n");
    }
    let _ = writeln!(
        md,
        "### Watermill's published figures (not this machine)\n\n\
         Watermill (Go) publishes its own benchmark, run on a 16-vCPU machine with its own \
         message sizes and settings. Its figures are listed next to this run's 256 B \
         publish-c64 and consume medians only to give a sense of scale: different machine, \
         different load, not a comparison.\n\n\
         | broker | Watermill publish | Watermill subscribe | evbus Bus publish-c64 (here) | evbus Bus consume (here) |\n\
         |---|---|---|---|---|"
    );
    for (key, name, publish, subscribe) in WATERMILL {
        let ours = adapters
            .iter()
            .find(|a| a.name == *key)
            .and_then(|a| a.sizes.iter().find(|s| s.size == 256));
        let (c64, consume) = match ours {
            Some(s) => (
                s.publish_c64
                    .as_ref()
                    .map_or_else(|| "—".to_owned(), |c| rate(c.bus.median)),
                rate(s.consume.bus.median),
            ),
            None => ("—".to_owned(), "—".to_owned()),
        };
        let _ = writeln!(
            md,
            "| {name} | {publish} | {subscribe} | {c64} | {consume} |"
        );
    }
    let _ = writeln!(md);
}

/// What the load row adds: whether other work competed with the run.
fn load_note(busy: bool) -> &'static str {
    if busy {
        " — other work competed with the run, hence wide spreads"
    } else {
        " (the brokers measured share the same cores)"
    }
}

/// Whether a 1-minute load (`/proc/loadavg`) reached the cores: other work competed.
fn is_busy(load: &str, cores: usize) -> bool {
    load.split_whitespace()
        .next()
        .and_then(|x| x.parse::<f64>().ok())
        .is_some_and(|x| x >= cores as f64)
}

/// The line saying which run an adapter's rows come from (see [`run_description`]).
fn run_line(md: &mut String, a: &AdapterResult, page: &crate::env::Environment) {
    if let Some(m) = &a.measured {
        let _ = writeln!(md, "{}\n", run_description(m, page));
    }
}

/// When run `m` started, its commit, its CPU if not the page's, and its load.
fn run_description(m: &crate::env::Environment, page: &crate::env::Environment) -> String {
    let commit = match m.commit.as_str() {
        "" => String::new(),
        c => format!(" of commit `{c}`"),
    };
    let cpu = if m.cpu == page.cpu {
        String::new()
    } else {
        format!(" on {} ({} cores)", m.cpu, m.cores)
    };
    let busy = [&m.load_start, &m.load_end]
        .iter()
        .any(|l| is_busy(l, m.cores));
    format!(
        "Run started {}{commit}{cpu}; load start `{}`, end `{}`{}.",
        m.started,
        m.load_start,
        m.load_end,
        load_note(busy)
    )
}

fn adapter_section(md: &mut String, a: &AdapterResult, page: &crate::env::Environment) {
    let p = &a.plan;
    let _ = writeln!(
        md,
        "### {}\n\n{} events per throughput run ({} per publish-c64 and publish-batch run), {} \
         rounds; latency: {} events offered at {}/s; {:.0} s in all.\n",
        a.name, p.events, p.burst_events, p.rounds, p.latency_events, p.latency_rate, a.seconds
    );
    run_line(md, a, page);
    let _ = writeln!(
        md,
        "| size | measure | raw (events/s) | adapter | Bus (evbus) | Bus/raw | adapter/raw | verdict |\n\
         |---|---|---|---|---|---|---|---|"
    );
    for s in &a.sizes {
        for (what, c) in s.measures() {
            let _ = writeln!(
                md,
                "| {} | {what} | {} | {} | {} | {:.2} | {:.2} | {} |",
                size_label(s.size),
                bmw(&c.raw, rate),
                bmw(&c.adapter, rate),
                bmw(&c.bus, rate),
                c.ratio,
                c.adapter_ratio,
                verdict(c)
            );
        }
        let live = |l: &str| {
            s.loops
                .get(l)
                .map(|x| stat(&x.live, true))
                .unwrap_or_default()
        };
        let _ = writeln!(
            md,
            "| {} | live | {} | {} | {} | {:.2} | {:.2} | |",
            size_label(s.size),
            bmw(&live("raw"), rate),
            bmw(&live("adapter"), rate),
            bmw(&live("bus"), rate),
            live("bus").median / live("raw").median,
            live("adapter").median / live("raw").median,
        );
    }
    let _ = writeln!(
        md,
        "\nEnd-to-end latency at {}/s offered (median round; best / **median** / worst):\n",
        p.latency_rate
    );
    let _ = writeln!(
        md,
        "| size | loop | p50 | p99 | p99.9 |\n|---|---|---|---|---|"
    );
    for s in &a.sizes {
        for l in ["raw", "adapter", "bus"] {
            if let Some(lat) = s.latency.get(l) {
                let _ = writeln!(
                    md,
                    "| {} | {l} | {} | {} | {} |",
                    size_label(s.size),
                    bmw(&lat[0], us),
                    bmw(&lat[1], us),
                    bmw(&lat[2], us)
                );
            }
        }
    }
    let errors: Vec<String> = a
        .sizes
        .iter()
        .flat_map(|s| {
            s.loops.iter().flat_map(move |(l, r)| {
                r.errors
                    .iter()
                    .map(move |e| format!("{} {l}: {e}", size_label(s.size)))
            })
        })
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(md, "\nFailed runs (left out of the figures):\n");
        for e in errors {
            let _ = writeln!(md, "- {e}");
        }
    }
    let _ = writeln!(md);
}

fn stat(values: &[f64], higher: bool) -> Stat {
    // Same rule as the run's summary: one implementation.
    Stat::of(values, higher)
}

fn num(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

fn callgrind_section(md: &mut String, cg: &Value) {
    let _ = writeln!(
        md,
        "`valgrind --tool=callgrind` ({}), collection on only inside the measured region \
         (`--toggle-collect`); every scenario run with 1,000 and with 2,000 events, the \
         difference divided by 1,000. Heap allocations counted by a counting global \
         allocator (`stats_alloc`) around the same region. Payloads of {} B (16 B for the \
         `-16` scenarios, where decoding the payload costs least); tokio \
         current-thread runtime. Instruction counts do not depend on machine load. \
         Callgrind does not count what runs in the kernel, so the same runs trace their \
         system calls (`--trace-syscalls=yes`) between two marks around the measured \
         region: clock reads are counted apart, as they are system calls only under \
         valgrind (a native run reads the clock through the vDSO).\n",
        cg.get("valgrind")
            .and_then(Value::as_str)
            .unwrap_or("valgrind"),
        cg.get("payload_bytes")
            .and_then(Value::as_u64)
            .unwrap_or(256)
    );
    let _ = writeln!(
        md,
        "| scenario | instructions / event | allocations / event | bytes allocated / event \
         | system calls / event | clock reads / event | aim |\n\
         |---|---|---|---|---|---|---|"
    );
    let aims = [
        ("consume-decode", "< 1,700 instructions, 0 allocations"),
        ("consume-decode-16", "< 1,700 instructions, 0 allocations"),
        ("emit-handle", "< 5,000 instructions"),
        ("emit-handle-16", "< 5,000 instructions"),
        ("emit-handle-validated", "—"),
        ("emit-typed-validated", "—"),
        ("emit-value-handle", "—"),
    ];
    if let Some(rows) = cg.get("scenarios").and_then(Value::as_array) {
        for row in rows {
            let name = row.get("name").and_then(Value::as_str).unwrap_or("?");
            let aim = aims
                .iter()
                .find(|(n, _)| *n == name)
                .map_or("—", |(_, a)| *a);
            // Runs from before the system calls were counted have no such figure.
            let per_event = |key: &str| {
                let n = num(row, key);
                if n.is_nan() {
                    "—".to_owned()
                } else {
                    format!("{n:.2}")
                }
            };
            let _ = writeln!(
                md,
                "| {name} | {} | {:.1} | {} | {} | {} | {aim} |",
                rate(num(row, "instructions_per_event")),
                num(row, "allocations_per_event"),
                rate(num(row, "bytes_per_event")),
                per_event("syscalls_per_event"),
                per_event("clock_reads_per_event"),
            );
        }
    }
    if let Some(cold) = cg.get("cold_start") {
        let _ = writeln!(
            md,
            "\nCold start (build the catalogue, the memory transport and the Bus, start the \
             handler, emit the first event until handled): **{} instructions**, {} \
             allocations{}.\n",
            rate(num(cold, "instructions")),
            rate(num(cold, "allocations")),
            match num(cold, "syscalls") {
                n if n.is_nan() => String::new(),
                n => format!(", {} system calls", rate(n)),
            }
        );
    }
    if let Some(base) = cg.get("baseline") {
        let _ = writeln!(
            md,
            "Against `{}`:\n\n| scenario | baseline | now | change | system calls, baseline → now \
             |\n|---|---|---|---|---|",
            base.get("ref").and_then(Value::as_str).unwrap_or("?")
        );
        if let Some(rows) = base.get("rows").and_then(Value::as_array) {
            for row in rows {
                let (was, now) = (num(row, "baseline_syscalls"), num(row, "current_syscalls"));
                // Comparisons from before the system calls were counted have none.
                let calls = if was.is_nan() || now.is_nan() {
                    "—".to_owned()
                } else {
                    format!("{was:.2} → {now:.2}")
                };
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {:+.1}% | {calls} |",
                    row.get("name").and_then(Value::as_str).unwrap_or("?"),
                    rate(num(row, "baseline")),
                    rate(num(row, "current")),
                    num(row, "change_pct")
                );
            }
        }
        let _ = writeln!(md);
    }
}

/// Throughput (median events/s, log scale) by payload size: one panel per adapter, raw /
/// adapter / Bus, publish solid and consume dashed.
fn chart(adapters: &[AdapterResult]) -> String {
    let (pw, ph) = (380.0_f64, 300.0_f64);
    let (left, right, top, bottom) = (78.0, 12.0, 34.0, 44.0);
    let width = (pw * adapters.len().max(1) as f64).max(800.0);
    let height = ph + 40.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let colors = [
        ("raw", "#7f7f7f"),
        ("adapter", "#1f77b4"),
        ("bus", "#d62728"),
    ];
    for (i, a) in adapters.iter().enumerate() {
        let x0 = i as f64 * pw;
        let series: Vec<(&str, &str, bool, Vec<f64>)> = colors
            .iter()
            .flat_map(|(l, c)| {
                [true, false].map(|publish| {
                    let ys = a
                        .sizes
                        .iter()
                        .map(|s| {
                            let r = s.loops.get(*l).cloned().unwrap_or_default();
                            stat(if publish { &r.publish } else { &r.consume }, true).median
                        })
                        .collect();
                    (*l, *c, publish, ys)
                })
            })
            .collect();
        let all: Vec<f64> = series
            .iter()
            .flat_map(|s| s.3.iter().copied())
            .filter(|y| y.is_finite() && *y > 0.0)
            .collect();
        let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(1.0);
        let hi = all.iter().copied().fold(0.0, f64::max).max(lo * 10.0);
        let (lo_e, hi_e) = (lo.log10().floor(), hi.log10().ceil());
        let plot_w = pw - left - right;
        let plot_h = ph - top - bottom;
        let y_of = |v: f64| top + plot_h * (1.0 - (v.log10() - lo_e) / (hi_e - lo_e).max(1.0));
        let n = a.sizes.len().max(1);
        let x_of = |j: usize| x0 + left + plot_w * (j as f64 + 0.5) / n as f64;
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="20" font-size="13" font-weight="bold" text-anchor="middle">{}</text>"#,
            x0 + left + plot_w / 2.0,
            a.name
        );
        let _ = writeln!(
            svg,
            r##"<rect x="{}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>"##,
            x0 + left
        );
        let mut e = lo_e;
        while e <= hi_e {
            let y = y_of(10f64.powf(e));
            let _ = writeln!(
                svg,
                r##"<line x1="{}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                x0 + left,
                x0 + left + plot_w,
                x0 + left - 4.0,
                y + 4.0,
                rate(10f64.powf(e))
            );
            e += 1.0;
        }
        for (j, s) in a.sizes.iter().enumerate() {
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                x_of(j),
                top + plot_h + 16.0,
                size_label(s.size)
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">payload size (events/s, median round, log scale)</text>"#,
            x0 + left + plot_w / 2.0,
            top + plot_h + 32.0
        );
        for (_, color, publish, ys) in &series {
            let points: Vec<String> = ys
                .iter()
                .enumerate()
                .filter(|(_, y)| y.is_finite() && **y > 0.0)
                .map(|(j, y)| format!("{:.1},{:.1}", x_of(j), y_of(*y)))
                .collect();
            let dash = if *publish {
                ""
            } else {
                r#" stroke-dasharray="5,3""#
            };
            let _ = writeln!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
                points.join(" ")
            );
            for p in &points {
                let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(svg, r#"<circle cx="{x}" cy="{y}" r="2.5" fill="{color}"/>"#);
            }
        }
    }
    // Legend.
    let mut lx = 10.0;
    let ly = height - 12.0;
    for (l, c) in colors {
        for (publish, what) in [(true, "publish"), (false, "consume")] {
            let dash = if publish {
                ""
            } else {
                r#" stroke-dasharray="5,3""#
            };
            let _ = writeln!(
                svg,
                r#"<line x1="{lx}" x2="{}" y1="{}" y2="{}" stroke="{c}" stroke-width="2"{dash}/><text x="{}" y="{ly}">{l} {what}</text>"#,
                lx + 22.0,
                ly - 4.0,
                ly - 4.0,
                lx + 26.0
            );
            lx += 130.0;
        }
    }
    let _ = SIZES;
    let _ = writeln!(svg, "</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_run_says_when_on_which_commit_and_under_what_load() {
        let page = crate::env::Environment {
            cpu: "CPU A".to_owned(),
            cores: 2,
            ..Default::default()
        };
        let run = crate::env::Environment {
            started: "2026-12-01T13:40:00Z".to_owned(),
            commit: "4378ae6aaaaa".to_owned(),
            load_start: "0.50 0.40 0.30 1/200 1".to_owned(),
            load_end: "2.10 1.00 0.50 1/200 1".to_owned(),
            ..page.clone()
        };
        assert_eq!(
            run_description(&run, &page),
            "Run started 2026-12-01T13:40:00Z of commit `4378ae6aaaaa`; load start \
             `0.50 0.40 0.30 1/200 1`, end `2.10 1.00 0.50 1/200 1` — other work competed \
             with the run, hence wide spreads."
        );
        // Another machine is named; a run from before commits were recorded names none.
        let other = crate::env::Environment {
            cpu: "CPU B".to_owned(),
            commit: String::new(),
            load_end: "0.90".to_owned(),
            ..run
        };
        assert_eq!(
            run_description(&other, &page),
            "Run started 2026-12-01T13:40:00Z on CPU B (2 cores); load start \
             `0.50 0.40 0.30 1/200 1`, end `0.90` (the brokers measured share the same cores)."
        );
    }

    #[test]
    fn the_callgrind_table_shows_system_calls_where_the_run_counted_them() {
        let cg: Value = serde_json::from_str(
            r#"{"valgrind": "valgrind-3.19.0", "payload_bytes": 256, "scenarios": [
                {"name": "emit-handle", "instructions_per_event": 10258.0,
                 "allocations_per_event": 8.0, "bytes_per_event": 1844.0,
                 "syscalls_per_event": 0.07, "clock_reads_per_event": 5.25},
                {"name": "consume-decode", "instructions_per_event": 1949.0,
                 "allocations_per_event": 0.0, "bytes_per_event": 0.0}],
              "cold_start": {"instructions": 4662628, "allocations": 6704, "syscalls": 75},
              "baseline": {"ref": "8c2daa2", "rows": [
                {"name": "emit-handle", "baseline": 10333.0, "current": 10258.0,
                 "change_pct": -0.73, "baseline_syscalls": 1.14, "current_syscalls": 0.07},
                {"name": "consume-decode", "baseline": 1967.0, "current": 1949.0,
                 "change_pct": -0.92}]}}"#,
        )
        .unwrap();
        let mut md = String::new();
        callgrind_section(&mut md, &cg);
        assert!(
            md.contains(
                "| emit-handle | 10,258 | 8.0 | 1,844 | 0.07 | 5.25 | < 5,000 instructions |"
            ),
            "{md}"
        );
        // A run from before system calls were counted says so rather than showing zero.
        assert!(
            md.contains("| consume-decode | 1,949 | 0.0 | 0 | — | — | < 1,700 instructions"),
            "{md}"
        );
        assert!(md.contains("6,704 allocations, 75 system calls."), "{md}");
        assert!(
            md.contains("| emit-handle | 10,333 | 10,258 | -0.7% | 1.14 → 0.07 |"),
            "{md}"
        );
        assert!(
            md.contains("| consume-decode | 1,967 | 1,949 | -0.9% | — |"),
            "{md}"
        );
    }

    #[test]
    fn gateway_lines_split_into_their_columns() {
        let post = "bench gateway post-events: evbus 2100/s p50 28.1 ms p99 60.2 ms bare 5400/s p50 11.0 ms p99 25.3 ms ratio 0.39";
        assert_eq!(
            gateway_row(post),
            Some([
                "post-events",
                "2100/s p50 28.1 ms p99 60.2 ms",
                "5400/s p50 11.0 ms p99 25.3 ms",
                "0.39",
                ""
            ])
        );
        let webhooks = "bench gateway webhook-deliveries: evbus 900/s bare 1800/s ratio 0.50 (1000 events x 10 receivers)";
        assert_eq!(
            gateway_row(webhooks),
            Some([
                "webhook-deliveries",
                "900/s",
                "1800/s",
                "0.50",
                "(1000 events x 10 receivers)"
            ])
        );
        assert_eq!(gateway_row("bench gateway sse-fanout: failed"), None);

        let mut md = String::new();
        gateway_section(
            &mut md,
            Some(&format!(
                "# 2026-12-01T14:00:00Z cargo xtask bench --gateway\n{post}\n{webhooks}\n"
            )),
        );
        assert!(md.contains("Measured 2026-12-01T14:00:00Z"), "{md}");
        assert!(
            md.contains(
                "| webhook-deliveries | 900/s | 1800/s | 0.50 | (1000 events x 10 receivers) |"
            ),
            "{md}"
        );
        let mut none = String::new();
        gateway_section(&mut none, None);
        assert!(none.contains("No gateway run"), "{none}");
    }
}
