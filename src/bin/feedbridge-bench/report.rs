//! One result row per scenario, and the table / CSV / JSON it is printed as.

use serde::{Deserialize, Serialize};

/// One scenario's figures; the JSON field names are stable.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub(crate) struct Row {
    pub(crate) path: String,
    pub(crate) subscribers: usize,
    pub(crate) writers: usize,
    pub(crate) target_rate: u64,
    pub(crate) keys_known: usize,
    pub(crate) written: u64,
    pub(crate) ceiling_per_s: f64,
    /// Write rate the database accepted during the bridged run (the bridge,
    /// the subscribers and the writers share the two cores).
    pub(crate) written_per_s: f64,
    pub(crate) bridged_per_s: f64,
    pub(crate) ratio: f64,
    /// bridged / written in the same run: whether the bridge kept up.
    pub(crate) keep_up: f64,
    pub(crate) plain_p50_ms: f64,
    pub(crate) plain_p99_ms: f64,
    pub(crate) plain_p999_ms: f64,
    pub(crate) bridged_p50_ms: f64,
    pub(crate) bridged_p99_ms: f64,
    pub(crate) bridged_p999_ms: f64,
    pub(crate) added_p99_ms: f64,
    pub(crate) missing: u64,
    pub(crate) max_lag: u64,
    /// The bridge's CPU per change, in µs (= ms per 1,000 changes): every
    /// thread of the bridge process, from /proc schedstat.
    pub(crate) bridge_cpu_ms_per_1k: f64,
    pub(crate) bridge_peak_rss_mb: f64,
    /// The floor: the plain consumer's CPU per change (µs), in a process of
    /// its own, the same load in the same run. (Absent from results saved
    /// before it was measured.)
    #[serde(default)]
    pub(crate) floor_cpu_us_per_change: f64,
    /// The bridge's CPU per change over the floor's.
    #[serde(default)]
    pub(crate) ratio_to_floor: f64,
    /// A minimal forwarder's CPU per change (µs): the plain consumer also
    /// handing each value to a libzmq PUB socket (0: not measured).
    #[serde(default)]
    pub(crate) forwarder_cpu_us_per_change: f64,
    /// The bridge's CPU per change over the forwarder's.
    #[serde(default)]
    pub(crate) ratio_to_forwarder: f64,
    /// Processes the subscribers ran in (0: the harness's own).
    #[serde(default)]
    pub(crate) subscriber_processes: usize,
    /// The p99 latency of the slowest subscriber.
    #[serde(default)]
    pub(crate) slowest_p99_ms: f64,
    /// The bridge's CPU per change and subscriber (µs).
    #[serde(default)]
    pub(crate) bridge_cpu_us_per_delivery: f64,
}

/// Each figure's median over several runs of one scenario (the upper
/// middle for an even count); counts are medians too, not sums.
pub(crate) fn median(runs: &[Row]) -> Row {
    fn mid<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
        v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN in results"));
        v[v.len() / 2]
    }
    let mut m = runs[0].clone();
    macro_rules! fields {
        ($($f:ident),*) => {$( m.$f = mid(runs.iter().map(|r| r.$f).collect()); )*};
    }
    fields!(
        written,
        ceiling_per_s,
        written_per_s,
        bridged_per_s,
        ratio,
        keep_up,
        plain_p50_ms,
        plain_p99_ms,
        plain_p999_ms,
        bridged_p50_ms,
        bridged_p99_ms,
        bridged_p999_ms,
        added_p99_ms,
        missing,
        max_lag,
        bridge_cpu_ms_per_1k,
        bridge_peak_rss_mb,
        floor_cpu_us_per_change,
        ratio_to_floor,
        forwarder_cpu_us_per_change,
        ratio_to_forwarder,
        slowest_p99_ms,
        bridge_cpu_us_per_delivery
    );
    m
}

/// The human-readable table.
pub(crate) fn print_table(rows: &[Row]) {
    println!(
        "{:<12} {:>4} {:>5} {:>8} {:>7} {:>10} {:>10} {:>10} {:>6} {:>7} {:>22} {:>22} {:>9} {:>7} {:>7} {:>10} {:>10} {:>7} {:>8}",
        "path", "subs", "rate", "keys", "written", "ceiling/s", "written/s", "bridged/s", "ratio", "keep-up",
        "plain p50/p99/p999 ms", "bridged p50/p99/p999", "added p99", "missing", "max lag", "cpu µs/chg", "floor µs", "× floor", "rss MB"
    );
    for r in rows {
        let rate = if r.target_rate == 0 {
            "max".to_string()
        } else {
            r.target_rate.to_string()
        };
        println!(
            "{:<12} {:>4} {:>5} {:>8} {:>7} {:>10.0} {:>10.0} {:>10.0} {:>6.3} {:>7.3} {:>22} {:>22} {:>9.2} {:>7} {:>7} {:>10.1} {:>10.1} {:>7.2} {:>8.1}",
            r.path, r.subscribers, rate, r.keys_known, r.written, r.ceiling_per_s, r.written_per_s, r.bridged_per_s, r.ratio, r.keep_up,
            format!("{:.2}/{:.2}/{:.2}", r.plain_p50_ms, r.plain_p99_ms, r.plain_p999_ms),
            format!("{:.2}/{:.2}/{:.2}", r.bridged_p50_ms, r.bridged_p99_ms, r.bridged_p999_ms),
            r.added_p99_ms, r.missing, r.max_lag, r.bridge_cpu_ms_per_1k, r.floor_cpu_us_per_change, r.ratio_to_floor, r.bridge_peak_rss_mb
        );
    }
    // The goal of issue 23 for the fixed-rate rows of one subscriber.
    let fixed: Vec<&Row> = rows
        .iter()
        .filter(|r| r.target_rate > 0 && r.subscribers == 1 && r.floor_cpu_us_per_change > 0.0)
        .collect();
    if fixed.iter().any(|r| r.forwarder_cpu_us_per_change > 0.0) {
        println!(
            "\n{:<12} {:>6} {:>12} {:>14} {:>10} {:>18} {:>14}",
            "path", "rate", "bridge µs", "floor µs", "× floor", "forwarder µs", "× forwarder"
        );
        for r in &fixed {
            println!(
                "{:<12} {:>6} {:>12.1} {:>14.1} {:>10.2} {:>18.1} {:>14.2}",
                r.path,
                r.target_rate,
                r.bridge_cpu_ms_per_1k,
                r.floor_cpu_us_per_change,
                r.ratio_to_floor,
                r.forwarder_cpu_us_per_change,
                r.ratio_to_forwarder
            );
        }
    }
    if !fixed.is_empty() {
        let worst = fixed.iter().map(|r| r.ratio_to_floor).fold(0.0, f64::max);
        println!(
            "goal: the bridge at most 2× its floor's CPU per change at a fixed rate: {} (worst {worst:.2}×)",
            if worst <= 2.0 { "met" } else { "not met" }
        );
        let forwarded = fixed.iter().filter(|r| r.ratio_to_forwarder > 0.0);
        if let Some(worst) = forwarded.map(|r| r.ratio_to_forwarder).reduce(f64::max) {
            println!("against the forwarder (the same consumer handing each value to libzmq): worst {worst:.2}×");
        }
    }
}

/// The fan-out table: per subscriber count, what each subscriber got and
/// what the bridge spent on each delivery.
pub(crate) fn print_fanout(rows: &[Row]) {
    println!(
        "{:<12} {:>5} {:>6} {:>6} {:>8} {:>8} {:>8} {:>12} {:>14} {:>12} {:>8}",
        "path",
        "subs",
        "procs",
        "rate",
        "written",
        "missing",
        "keep-up",
        "p99 ms",
        "slowest p99",
        "µs/delivery",
        "rss MB"
    );
    for r in rows {
        println!(
            "{:<12} {:>5} {:>6} {:>6} {:>8} {:>8} {:>8.3} {:>12.2} {:>14.2} {:>12.2} {:>8.1}",
            r.path,
            r.subscribers,
            r.subscriber_processes,
            r.target_rate,
            r.written,
            r.missing,
            r.keep_up,
            r.bridged_p99_ms,
            r.slowest_p99_ms,
            r.bridge_cpu_us_per_delivery,
            r.bridge_peak_rss_mb
        );
    }
}

/// The rows as CSV.
pub(crate) fn csv(rows: &[Row]) -> String {
    let mut out = String::from("path,subscribers,writers,target_rate,keys_known,written,ceiling_per_s,written_per_s,bridged_per_s,ratio,keep_up,plain_p50_ms,plain_p99_ms,plain_p999_ms,bridged_p50_ms,bridged_p99_ms,bridged_p999_ms,added_p99_ms,missing,max_lag,bridge_cpu_ms_per_1k,bridge_peak_rss_mb,floor_cpu_us_per_change,ratio_to_floor,forwarder_cpu_us_per_change,ratio_to_forwarder,subscriber_processes,slowest_p99_ms,bridge_cpu_us_per_delivery\n");
    for r in rows {
        out.push_str(&format!(
            "{},{},{},{},{},{},{:.1},{:.1},{:.1},{:.4},{:.4},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{},{},{:.2},{:.1},{:.2},{:.3},{:.2},{:.3},{},{:.3},{:.3}\n",
            r.path, r.subscribers, r.writers, r.target_rate, r.keys_known, r.written, r.ceiling_per_s, r.written_per_s, r.bridged_per_s, r.ratio, r.keep_up,
            r.plain_p50_ms, r.plain_p99_ms, r.plain_p999_ms, r.bridged_p50_ms, r.bridged_p99_ms, r.bridged_p999_ms,
            r.added_p99_ms, r.missing, r.max_lag, r.bridge_cpu_ms_per_1k, r.bridge_peak_rss_mb,
            r.floor_cpu_us_per_change, r.ratio_to_floor, r.forwarder_cpu_us_per_change, r.ratio_to_forwarder, r.subscriber_processes, r.slowest_p99_ms, r.bridge_cpu_us_per_delivery
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cpu: f64, missing: u64) -> Row {
        Row {
            path: "etcd->zmq".into(),
            subscribers: 1,
            writers: 8,
            target_rate: 0,
            keys_known: 0,
            written: 100,
            ceiling_per_s: 10.0,
            written_per_s: 10.0,
            bridged_per_s: 10.0,
            ratio: 1.0,
            keep_up: 1.0,
            plain_p50_ms: 1.0,
            plain_p99_ms: 2.0,
            plain_p999_ms: 3.0,
            bridged_p50_ms: 1.0,
            bridged_p99_ms: 2.0,
            bridged_p999_ms: 3.0,
            added_p99_ms: 0.0,
            missing,
            max_lag: 0,
            bridge_cpu_ms_per_1k: cpu,
            bridge_peak_rss_mb: 20.0,
            floor_cpu_us_per_change: cpu / 2.0,
            ratio_to_floor: 2.0,
            forwarder_cpu_us_per_change: 0.0,
            ratio_to_forwarder: 0.0,
            subscriber_processes: 0,
            slowest_p99_ms: 2.0,
            bridge_cpu_us_per_delivery: cpu,
        }
    }

    #[test]
    fn median_takes_each_figure_on_its_own() {
        let m = median(&[row(30.0, 0), row(10.0, 7), row(20.0, 1)]);
        assert_eq!(m.bridge_cpu_ms_per_1k, 20.0);
        assert_eq!(m.missing, 1, "a count is a median too, not a sum");
        assert_eq!(m.path, "etcd->zmq");
    }
}
