//! Comparing runs question by question: EM on a subset of the questions,
//! and the paired bootstrap interval of the difference between two runs.
//!
//! Two runs are compared on the questions both answered (matched by id);
//! the bootstrap resamples those questions with replacement, the same
//! resample for both runs, and reads the 2.5th and 97.5th percentiles of
//! the EM difference. The generator is seeded, so reports are repeatable.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

/// Exact match of one run, question by question.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcomes(pub HashMap<String, bool>);

impl Outcomes {
    /// From `(id, em)` pairs.
    pub fn new<'a>(items: impl IntoIterator<Item = (&'a str, bool)>) -> Outcomes {
        Outcomes(items.into_iter().map(|(id, em)| (id.to_string(), em)).collect())
    }

    /// The outcomes of the questions in `ids` only (all when `None`).
    pub fn within(&self, ids: Option<&HashSet<String>>) -> Outcomes {
        match ids {
            None => self.clone(),
            Some(ids) => {
                Outcomes(self.0.iter().filter(|(id, _)| ids.contains(*id)).map(|(k, v)| (k.clone(), *v)).collect())
            }
        }
    }

    /// Questions.
    pub fn n(&self) -> usize {
        self.0.len()
    }

    /// Share answered exactly (0 when empty).
    pub fn em(&self) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.values().filter(|&&e| e).count() as f64 / self.0.len() as f64
    }
}

/// The EM difference of two runs on the questions both answered.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Difference {
    /// Questions compared.
    pub n: usize,
    /// EM of the run minus EM of the baseline.
    pub diff: f64,
    /// 2.5th percentile of the bootstrap differences.
    pub lo: f64,
    /// 97.5th percentile.
    pub hi: f64,
    /// Questions only the run got right.
    pub wins: usize,
    /// Questions only the baseline got right.
    pub losses: usize,
}

/// Resamples in [`paired_bootstrap`] by default.
pub const RESAMPLES: usize = 10_000;

/// The paired bootstrap 95% interval of `run`'s EM minus `baseline`'s.
pub fn paired_bootstrap(run: &Outcomes, baseline: &Outcomes, resamples: usize, seed: u64) -> Difference {
    let mut ids: Vec<&String> = run.0.keys().filter(|id| baseline.0.contains_key(*id)).collect();
    ids.sort();
    // Per question: +1 only the run right, -1 only the baseline, 0 both or neither.
    let d: Vec<i32> = ids.iter().map(|id| i32::from(run.0[*id]) - i32::from(baseline.0[*id])).collect();
    let n = d.len();
    let (wins, losses) = (d.iter().filter(|&&x| x > 0).count(), d.iter().filter(|&&x| x < 0).count());
    if n == 0 {
        return Difference { n, diff: 0.0, lo: 0.0, hi: 0.0, wins, losses };
    }
    let diff = d.iter().sum::<i32>() as f64 / n as f64;
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut means: Vec<f64> = (0..resamples.max(1))
        .map(|_| {
            let s: i64 = (0..n).map(|_| d[(next() % n as u64) as usize] as i64).sum();
            s as f64 / n as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * (means.len() - 1) as f64).round() as usize).min(means.len() - 1)];
    Difference { n, diff, lo: at(0.025), hi: at(0.975), wins, losses }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcomes(v: &[bool]) -> Outcomes {
        Outcomes(v.iter().enumerate().map(|(i, &e)| (format!("q{i}"), e)).collect())
    }

    #[test]
    fn identical_runs_differ_by_nothing() {
        let a = outcomes(&[true, false, true, true, false]);
        let d = paired_bootstrap(&a, &a, 1000, 1);
        assert_eq!((d.n, d.diff, d.lo, d.hi, d.wins, d.losses), (5, 0.0, 0.0, 0.0, 0, 0));
    }

    #[test]
    fn a_clear_gain_has_an_interval_above_zero_and_noise_does_not() {
        // 200 questions: the run wins 40, loses 5.
        let base: Vec<bool> = (0..200).map(|i| i % 4 == 0).collect();
        let run: Vec<bool> = (0..200).map(|i| i % 4 == 0 || (i % 4 == 1 && i < 160)).collect();
        let mut run = run;
        for i in [0, 4, 8, 12, 16] {
            run[i] = false;
        }
        let d = paired_bootstrap(&outcomes(&run), &outcomes(&base), RESAMPLES, 7);
        assert_eq!((d.wins, d.losses), (40, 5));
        assert!((d.diff - 35.0 / 200.0).abs() < 1e-12);
        assert!(d.lo > 0.1 && d.hi < 0.25 && d.lo < d.diff && d.diff < d.hi, "{d:?}");
        // Two wins and two losses: the interval spans zero.
        let mut noisy = base.clone();
        noisy[1] = true;
        noisy[2] = true;
        noisy[0] = false;
        noisy[4] = false;
        let d = paired_bootstrap(&outcomes(&noisy), &outcomes(&base), RESAMPLES, 7);
        assert!(d.lo < 0.0 && d.hi > 0.0 && d.diff == 0.0, "{d:?}");
    }

    #[test]
    fn only_shared_questions_are_compared_and_subsets_select() {
        let a = Outcomes::new([("x", true), ("y", false), ("z", true)]);
        let b = Outcomes::new([("x", false), ("y", false)]);
        let d = paired_bootstrap(&a, &b, 100, 0);
        assert_eq!((d.n, d.wins, d.losses), (2, 1, 0));
        let ids: HashSet<String> = ["x".to_string(), "z".to_string()].into();
        let sub = a.within(Some(&ids));
        assert_eq!((sub.n(), sub.em()), (2, 1.0));
    }
}
