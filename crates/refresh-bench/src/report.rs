//! The figures of a run: the summary table (stdout) and the JSON document.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Map, Value, json};

/// One measured figure.
struct Figure {
    scenario: String,
    key: String,
    label: String,
    value: f64,
    unit: String,
}

/// A target of the issue and how the run did against it.
struct Verdict {
    target: String,
    measured: String,
    met: Option<bool>,
}

pub(crate) struct Report {
    machine: Value,
    figures: Vec<Figure>,
    notes: Vec<(String, String)>,
    missing: Vec<(String, String)>,
    verdicts: Vec<Verdict>,
    total: Duration,
}

impl Report {
    pub(crate) fn new(machine: Value) -> Self {
        Self {
            machine,
            figures: Vec::new(),
            notes: Vec::new(),
            missing: Vec::new(),
            verdicts: Vec::new(),
            total: Duration::ZERO,
        }
    }

    /// Records `value` (in `unit`) as `scenario.key`, shown as `label`.
    pub(crate) fn figure(
        &mut self,
        scenario: &str,
        key: &str,
        label: &str,
        value: f64,
        unit: &str,
    ) {
        crate::progress(&format!("{scenario}: {label} = {} {unit}", show(value)));
        self.figures.push(Figure {
            scenario: scenario.to_owned(),
            key: key.to_owned(),
            label: label.to_owned(),
            value,
            unit: unit.to_owned(),
        });
    }

    /// A remark on a scenario (printed under the table, kept in the JSON).
    pub(crate) fn note(&mut self, scenario: &str, text: &str) {
        self.notes.push((scenario.to_owned(), text.to_owned()));
    }

    /// A scenario (or part of one) that produced no figure, and why.
    pub(crate) fn not_measured(&mut self, scenario: &str, why: &str) {
        self.missing.push((scenario.to_owned(), why.to_owned()));
    }

    /// Turns a scenario's failure into a "not measured" line instead of ending the run.
    pub(crate) fn failed_if(&mut self, scenario: &str, outcome: anyhow::Result<()>) {
        if let Err(error) = outcome {
            crate::progress(&format!("{scenario} failed: {error:#}"));
            self.not_measured(scenario, &format!("failed: {error:#}"));
        }
    }

    pub(crate) fn set_total(&mut self, total: Duration) {
        self.total = total;
    }

    pub(crate) fn get(&self, scenario: &str, key: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|f| f.scenario == scenario && f.key == key)
            .map(|f| f.value)
    }

    fn verdict(&mut self, target: &str, measured: Option<(String, bool)>) {
        let (measured, met) = match measured {
            Some((text, met)) => (text, Some(met)),
            None => ("not measured".to_owned(), None),
        };
        self.verdicts.push(Verdict {
            target: target.to_owned(),
            measured,
            met,
        });
    }

    /// Checks the targets against the figures.
    pub(crate) fn judge(&mut self) {
        let ratio = self.get("admission", "ratio");
        self.verdict(
            "admission/s ≥ 50 % of min(raw limits)",
            ratio.map(|r| (format!("{:.0} %", r * 100.0), r >= 0.5)),
        );
        let p99 = self.get("admission", "half_p99_ms");
        self.verdict(
            "p99 admission latency ≤ 10 ms at half load",
            p99.map(|p| (format!("{p:.1} ms"), p <= 10.0)),
        );
        let upstream = self.get("upstream", "vs_http");
        self.verdict(
            "upstream AMQP admissions/s ≥ 0.9 × HTTP admissions/s",
            upstream.map(|r| (format!("{r:.2} ×"), r >= 0.9)),
        );
        let overhead = self.get("worker", "overhead_ms_1");
        self.verdict(
            "worker overhead ≤ 5 ms per refresh beyond the bank calls",
            overhead.map(|o| (format!("{o:.2} ms"), o <= 5.0)),
        );
        let scaling = match (
            self.get("worker", "jobs_per_s_1"),
            self.get("worker", "jobs_per_s_2"),
            self.get("worker", "jobs_per_s_4"),
        ) {
            (Some(one), Some(two), Some(four)) => Some((
                format!("{one:.0} → {two:.0} → {four:.0} jobs/s"),
                two > one * 1.05 || self.get("worker", "cpu_full_1").is_some_and(|f| f >= 0.9),
            )),
            _ => None,
        };
        self.verdict(
            "worker throughput grows with processes until the CPU is full",
            scaling,
        );
        let scale_out = match (
            self.get("scaleout", "refreshes_per_s_1"),
            self.get("scaleout", "refreshes_per_s_2"),
            self.get("scaleout", "refreshes_per_s_4"),
            self.get("scaleout", "stagger_cap_per_s"),
        ) {
            (Some(one), Some(two), Some(four), Some(cap)) => Some((
                format!("{one:.1} → {two:.1} → {four:.1} refreshes/s (cap {cap:.1})"),
                two > one * 1.3 && (four > two * 1.3 || four >= cap * 0.85),
            )),
            _ => None,
        };
        self.verdict(
            "bank-bound refreshes/s grow with worker processes up to the stagger limit",
            scale_out,
        );
        let at_bank = match (
            self.get("scaleout", "max_bank_starts_per_period"),
            self.get("scaleout", "stagger_limit"),
        ) {
            (Some(most), Some(limit)) => Some((
                format!("at most {most:.0} starts per period (limit {limit:.0})"),
                most <= limit,
            )),
            _ => None,
        };
        self.verdict(
            "the bank never sees more than stagger.limit starts in any period",
            at_bank,
        );
        let merge = self.get("merge", "ratio_1m_10k");
        self.verdict(
            "merge at 1M stored ≤ 2× merge at 10k",
            merge.map(|r| (format!("{r:.2}×"), r <= 2.0)),
        );
        let rebuild = self.get("rebuild", "seconds_100k");
        self.verdict(
            "gate state of 100k consents rebuilt in seconds (≤ 10 s)",
            rebuild.map(|s| (format!("{s:.1} s"), s <= 10.0)),
        );
        let rss = self.get("worker", "peak_rss_mib");
        self.verdict(
            "peak RSS of a worker ≤ 64 MiB under load",
            rss.map(|r| (format!("{r:.1} MiB"), r <= 64.0)),
        );
    }

    /// The summary table, Markdown.
    pub(crate) fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "\n## refresh-bench results\n");
        let _ = writeln!(
            out,
            "machine: {}, {} cores, {} MiB memory; run took {:.0} s\n",
            self.machine["cpu_model"].as_str().unwrap_or("?"),
            self.machine["nproc"],
            self.machine["memory_mib"],
            self.total.as_secs_f64()
        );
        let _ = writeln!(out, "| scenario | figure | value | unit |");
        let _ = writeln!(out, "| --- | --- | ---: | --- |");
        for f in &self.figures {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} |",
                f.scenario,
                f.label,
                show(f.value),
                f.unit
            );
        }
        for (scenario, why) in &self.missing {
            let _ = writeln!(out, "| {scenario} | not measured: {why} | – | |");
        }
        let _ = writeln!(out, "\n| target | measured | verdict |");
        let _ = writeln!(out, "| --- | --- | --- |");
        for v in &self.verdicts {
            let verdict = match v.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "not measured",
            };
            let _ = writeln!(out, "| {} | {} | {verdict} |", v.target, v.measured);
        }
        if !self.notes.is_empty() {
            let _ = writeln!(out);
            for (scenario, text) in &self.notes {
                let _ = writeln!(out, "- {scenario}: {text}");
            }
        }
        out
    }

    pub(crate) fn json(&self) -> Value {
        let mut scenarios = Map::new();
        for f in &self.figures {
            let entry = scenarios
                .entry(f.scenario.clone())
                .or_insert_with(|| json!({}));
            entry[f.key.as_str()] = json!({ "label": f.label, "value": f.value, "unit": f.unit });
        }
        json!({
            "machine": self.machine,
            "generated_at": chrono::Utc::now().to_rfc3339(),
            "total_secs": self.total.as_secs_f64(),
            "scenarios": scenarios,
            "not_measured": self.missing.iter().map(|(s, w)| json!({"scenario": s, "why": w})).collect::<Vec<_>>(),
            "targets": self.verdicts.iter().map(|v| json!({"target": v.target, "measured": v.measured, "met": v.met})).collect::<Vec<_>>(),
            "notes": self.notes.iter().map(|(s, t)| json!({"scenario": s, "note": t})).collect::<Vec<_>>(),
        })
    }
}

/// A figure with sensible precision.
fn show(value: f64) -> String {
    if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}
