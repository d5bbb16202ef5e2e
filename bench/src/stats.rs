//! Figures, floors and goals: percentiles of one run, and the summary over several runs
//! (medians, p99, and the noise flag on runs whose floor strayed from the median floor).

use std::fmt::Write as _;

/// A run is flagged noisy when its floor deviates more than this from the median floor.
pub const NOISE_TOLERANCE: f64 = 0.20;

/// What a metric must reach. Ratios are always `figure / floor`.
#[derive(Clone, Copy, Debug)]
pub enum Goal {
    /// Lower is better (latency): `figure / floor <= x`.
    RatioAtMost(f64),
    /// Higher is better (throughput): `figure / floor >= x`.
    RatioAtLeast(f64),
    /// An absolute ceiling on the figure (its unit), no floor.
    AtMost(f64),
    /// An absolute minimum of the figure (its unit), no floor.
    AtLeast(f64),
    /// No goal: a figure printed to explain another (where a latency goes, say).
    Diagnostic,
}

impl Goal {
    fn met(self, figure: f64, ratio: Option<f64>) -> bool {
        match (self, ratio) {
            (Goal::RatioAtMost(x), Some(r)) => r <= x,
            (Goal::RatioAtLeast(x), Some(r)) => r >= x,
            (Goal::AtMost(x), _) => figure <= x,
            (Goal::AtLeast(x), _) => figure >= x,
            (Goal::Diagnostic, _) => true,
            (_, None) => false,
        }
    }

    fn describe(self) -> String {
        match self {
            Goal::RatioAtMost(x) => format!("≤ {x}× floor"),
            Goal::RatioAtLeast(x) => format!("≥ {x}× floor"),
            Goal::AtMost(x) => format!("≤ {}", fmt_num(x)),
            Goal::AtLeast(x) => format!("≥ {}", fmt_num(x)),
            Goal::Diagnostic => "— (diagnostic)".to_owned(),
        }
    }
}

/// One measured metric of one run: the figure and, when the goal is relative, its floor.
#[derive(Clone, Debug)]
pub struct Metric {
    pub name: String,
    pub unit: &'static str,
    pub figure: f64,
    /// `None` for absolute goals.
    pub floor: Option<Floor>,
    pub goal: Goal,
}

#[derive(Clone, Debug)]
pub struct Floor {
    pub name: String,
    pub value: f64,
}

impl Metric {
    pub fn relative(
        name: impl Into<String>,
        unit: &'static str,
        figure: f64,
        floor_name: impl Into<String>,
        floor: f64,
        goal: Goal,
    ) -> Metric {
        Metric {
            name: name.into(),
            unit,
            figure,
            floor: Some(Floor {
                name: floor_name.into(),
                value: floor,
            }),
            goal,
        }
    }

    pub fn absolute(
        name: impl Into<String>,
        unit: &'static str,
        figure: f64,
        goal: Goal,
    ) -> Metric {
        Metric {
            name: name.into(),
            unit,
            figure,
            floor: None,
            goal,
        }
    }

    fn ratio(&self) -> Option<f64> {
        self.floor
            .as_ref()
            .filter(|f| f.value > 0.0)
            .map(|f| self.figure / f.value)
    }
}

/// The `q`-quantile (0..=1) of `values` by nearest rank; 0 for an empty slice.
pub fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let rank = (q * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

/// Latencies in microseconds → (p50, p99) in milliseconds.
pub fn p50_p99_ms(latencies_us: &mut [f64]) -> (f64, f64) {
    (
        quantile(latencies_us, 0.50) / 1000.0,
        quantile(latencies_us, 0.99) / 1000.0,
    )
}

/// One metric summarised over every run.
#[derive(Debug)]
pub struct Summary {
    pub scenario: String,
    pub name: String,
    pub unit: &'static str,
    pub floor_name: Option<String>,
    pub figure_median: f64,
    pub figure_p99: f64,
    pub floor_median: Option<f64>,
    pub ratio_median: Option<f64>,
    pub ratio_worst: Option<f64>,
    pub goal: Goal,
    pub met: bool,
    pub runs: usize,
    /// Indices (1-based) of runs whose floor deviated more than 20 % from the median floor.
    pub noisy_runs: Vec<usize>,
}

/// Summarises the runs of one metric (same name across runs).
pub fn summarise(scenario: &str, runs: &[Metric]) -> Option<Summary> {
    let first = runs.first()?;
    let mut figures: Vec<f64> = runs.iter().map(|m| m.figure).collect();
    let figure_median = quantile(&mut figures, 0.5);
    let figure_p99 = quantile(&mut figures, 0.99);
    let mut floors: Vec<f64> = runs
        .iter()
        .filter_map(|m| m.floor.as_ref().map(|f| f.value))
        .collect();
    let floor_median = (!floors.is_empty()).then(|| quantile(&mut floors, 0.5));
    let noisy_runs = match floor_median {
        Some(med) if med > 0.0 => runs
            .iter()
            .enumerate()
            .filter(|(_, m)| {
                m.floor
                    .as_ref()
                    .is_some_and(|f| ((f.value - med) / med).abs() > NOISE_TOLERANCE)
            })
            .map(|(i, _)| i + 1)
            .collect(),
        _ => Vec::new(),
    };
    let mut ratios: Vec<f64> = runs.iter().filter_map(Metric::ratio).collect();
    let ratio_median = (!ratios.is_empty()).then(|| quantile(&mut ratios, 0.5));
    // The worst run is the one furthest on the wrong side of the goal.
    let ratio_worst = match first.goal {
        Goal::RatioAtLeast(_) => ratios.first().copied(),
        _ => ratios.last().copied(),
    };
    let met = first.goal.met(figure_median, ratio_median);
    Some(Summary {
        scenario: scenario.to_owned(),
        name: first.name.clone(),
        unit: first.unit,
        floor_name: first.floor.as_ref().map(|f| f.name.clone()),
        figure_median,
        figure_p99,
        floor_median,
        ratio_median,
        ratio_worst,
        goal: first.goal,
        met,
        runs: runs.len(),
        noisy_runs,
    })
}

pub fn fmt_num(x: f64) -> String {
    if x == 0.0 {
        "0".to_owned()
    } else if x.abs() >= 1000.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

/// The results as one markdown table.
pub fn markdown(summaries: &[Summary]) -> String {
    let mut out = String::from(
        "| scenario | metric | figure (median) | figure (p99 of runs) | floor (median) | ratio median (worst run) | goal | met | runs | noisy runs |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for s in summaries {
        let floor = match (&s.floor_name, s.floor_median) {
            (Some(n), Some(v)) => format!("{} {} ({n})", fmt_num(v), s.unit),
            _ => "—".to_owned(),
        };
        let ratio = match (s.ratio_median, s.ratio_worst) {
            (Some(m), Some(w)) => format!("{m:.2}× ({w:.2}×)"),
            _ => "—".to_owned(),
        };
        let noisy = if s.noisy_runs.is_empty() {
            "none".to_owned()
        } else {
            s.noisy_runs
                .iter()
                .map(|i| format!("#{i}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} {} | {} {} | {} | {} | {} | {} | {} | {} |",
            s.scenario,
            s.name,
            fmt_num(s.figure_median),
            s.unit,
            fmt_num(s.figure_p99),
            s.unit,
            floor,
            ratio,
            s.goal.describe(),
            match (s.goal, s.met) {
                (Goal::Diagnostic, _) => "—",
                (_, true) => "met",
                (_, false) => "**missed**",
            },
            s.runs,
            noisy
        );
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn quantile_takes_the_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&mut v, 0.5), 50.0);
        assert_eq!(quantile(&mut v, 0.99), 99.0);
        assert_eq!(quantile(&mut v, 1.0), 100.0);
        assert_eq!(quantile(&mut [], 0.5), 0.0);
    }

    #[test]
    fn a_run_whose_floor_strays_more_than_20_percent_is_flagged_noisy() {
        let runs: Vec<Metric> = [100.0, 102.0, 130.0]
            .iter()
            .map(|f| Metric::relative("p99", "ms", 2.0, "floor", *f, Goal::RatioAtMost(3.0)))
            .collect();
        let s = summarise("s", &runs).unwrap();
        assert_eq!(s.noisy_runs, vec![3]);
        assert_eq!(s.floor_median, Some(102.0));
    }

    #[test]
    fn throughput_goal_is_met_only_at_or_above_the_ratio() {
        let at = |figure| {
            let runs = [Metric::relative(
                "rate",
                "msg/s",
                figure,
                "floor",
                1000.0,
                Goal::RatioAtLeast(0.3),
            )];
            summarise("s", &runs).unwrap().met
        };
        assert!(at(300.0));
        assert!(!at(299.0));
    }

    #[test]
    fn an_absolute_goal_ignores_floors() {
        let runs = [Metric::absolute("lost", "frames", 1.0, Goal::AtMost(0.0))];
        let s = summarise("s", &runs).unwrap();
        assert!(!s.met);
        assert!(markdown(&[s]).contains("**missed**"));
    }
}
