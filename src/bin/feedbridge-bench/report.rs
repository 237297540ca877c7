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
    pub(crate) bridge_cpu_ms_per_1k: f64,
    pub(crate) bridge_peak_rss_mb: f64,
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
        bridge_peak_rss_mb
    );
    m
}

/// The human-readable table.
pub(crate) fn print_table(rows: &[Row]) {
    println!(
        "{:<12} {:>4} {:>5} {:>8} {:>7} {:>10} {:>10} {:>10} {:>6} {:>7} {:>22} {:>22} {:>9} {:>7} {:>7} {:>10} {:>8}",
        "path", "subs", "rate", "keys", "written", "ceiling/s", "written/s", "bridged/s", "ratio", "keep-up",
        "plain p50/p99/p999 ms", "bridged p50/p99/p999", "added p99", "missing", "max lag", "cpu µs/chg", "rss MB"
    );
    for r in rows {
        let rate = if r.target_rate == 0 {
            "max".to_string()
        } else {
            r.target_rate.to_string()
        };
        println!(
            "{:<12} {:>4} {:>5} {:>8} {:>7} {:>10.0} {:>10.0} {:>10.0} {:>6.3} {:>7.3} {:>22} {:>22} {:>9.2} {:>7} {:>7} {:>10.1} {:>8.1}",
            r.path, r.subscribers, rate, r.keys_known, r.written, r.ceiling_per_s, r.written_per_s, r.bridged_per_s, r.ratio, r.keep_up,
            format!("{:.2}/{:.2}/{:.2}", r.plain_p50_ms, r.plain_p99_ms, r.plain_p999_ms),
            format!("{:.2}/{:.2}/{:.2}", r.bridged_p50_ms, r.bridged_p99_ms, r.bridged_p999_ms),
            r.added_p99_ms, r.missing, r.max_lag, r.bridge_cpu_ms_per_1k, r.bridge_peak_rss_mb
        );
    }
}

/// The rows as CSV.
pub(crate) fn csv(rows: &[Row]) -> String {
    let mut out = String::from("path,subscribers,writers,target_rate,keys_known,written,ceiling_per_s,written_per_s,bridged_per_s,ratio,keep_up,plain_p50_ms,plain_p99_ms,plain_p999_ms,bridged_p50_ms,bridged_p99_ms,bridged_p999_ms,added_p99_ms,missing,max_lag,bridge_cpu_ms_per_1k,bridge_peak_rss_mb\n");
    for r in rows {
        out.push_str(&format!(
            "{},{},{},{},{},{},{:.1},{:.1},{:.1},{:.4},{:.4},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{},{},{:.2},{:.1}\n",
            r.path, r.subscribers, r.writers, r.target_rate, r.keys_known, r.written, r.ceiling_per_s, r.written_per_s, r.bridged_per_s, r.ratio, r.keep_up,
            r.plain_p50_ms, r.plain_p99_ms, r.plain_p999_ms, r.bridged_p50_ms, r.bridged_p99_ms, r.bridged_p999_ms,
            r.added_p99_ms, r.missing, r.max_lag, r.bridge_cpu_ms_per_1k, r.bridge_peak_rss_mb
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
