//! The training curves PNG (`curves.png`): loss (train and eval) and reward
//! margins read from `metrics.jsonl`.

use std::path::Path;

use tabletrace_plot::{line_charts, Panel, Series};

use crate::error::{io, Error, Result};

/// Loss (train and eval) and reward-margin curves from a `metrics.jsonl`.
pub fn training_curves(metrics: &Path, png: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics).map_err(io(metrics))?;
    let keys = ["loss", "eval_loss", "rewards/margins", "eval_rewards/margins"];
    let mut series: Vec<Series> =
        ["train", "eval", "train", "eval"].iter().map(|n| Series { name: n.to_string(), points: Vec::new() }).collect();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let Some(step) = v.get("step").and_then(|s| s.as_f64()) else { continue };
        for (s, key) in series.iter_mut().zip(keys) {
            if let Some(y) = v.get(key).and_then(|y| y.as_f64()) {
                s.points.push((step, y));
            }
        }
    }
    let mut it = series.into_iter();
    let (loss, eval_loss, margin, eval_margin) =
        (it.next().expect("4"), it.next().expect("4"), it.next().expect("4"), it.next().expect("4"));
    let mut panels = vec![Panel {
        title: "LOSS".into(),
        x_label: "STEP".into(),
        series: vec![loss, eval_loss].into_iter().filter(|s| !s.points.is_empty()).collect(),
    }];
    if !margin.points.is_empty() {
        panels.push(Panel {
            title: "REWARD MARGIN".into(),
            x_label: "STEP".into(),
            series: vec![margin, eval_margin].into_iter().filter(|s| !s.points.is_empty()).collect(),
        });
    }
    line_charts(&panels, png).map_err(|e| Error::Setup(format!("training curves: {e}")))
}
