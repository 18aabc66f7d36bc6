//! `tabletrace report`: runs side by side in Markdown, with PNG charts.
//!
//! A run directory holds `eval.json` (from `tabletrace eval`) and, when it
//! was trained, `metrics.jsonl`. The report names each run by its folder.

use std::path::{Path, PathBuf};

use tabletrace_train::plot::{bar_chart, line_charts, Panel, Series};

use crate::{Error, EvalReport, Result};

/// One run's evaluation.
#[derive(Debug, Clone)]
pub struct Run {
    /// Display name (the folder name).
    pub name: String,
    /// The folder.
    pub dir: PathBuf,
    /// Its `eval.json`.
    pub eval: EvalReport,
}

/// Reads `eval.json` of each run directory.
pub fn load_runs(dirs: &[PathBuf]) -> Result<Vec<Run>> {
    let mut runs = Vec::new();
    for dir in dirs {
        let path = dir.join("eval.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::File { path: path.clone(), message: format!("{e} (run `tabletrace eval` first)") })?;
        let eval: EvalReport =
            serde_json::from_str(&text).map_err(|e| Error::File { path: path.clone(), message: e.to_string() })?;
        let name = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
        runs.push(Run { name, dir: dir.clone(), eval });
    }
    if runs.is_empty() {
        return Err(Error::Empty("no run directories given".into()));
    }
    Ok(runs)
}

fn pct(v: f64) -> String {
    format!("{:.1}", v * 100.0)
}

/// Writes `report.md`, `accuracy.png` and (when runs were trained)
/// `training.png` into `out`; returns the Markdown.
pub fn write_report(runs: &[Run], out: &Path) -> Result<String> {
    std::fs::create_dir_all(out).map_err(|e| Error::File { path: out.to_path_buf(), message: e.to_string() })?;
    let mut tables: Vec<String> = runs.iter().flat_map(|r| r.eval.by_tables.keys().cloned()).collect();
    tables.sort();
    tables.dedup();
    let mut kinds: Vec<String> = runs.iter().flat_map(|r| r.eval.by_kind.keys().cloned()).collect();
    kinds.sort();
    kinds.dedup();
    let mut md = String::from("# tabletrace report\n\n");
    md.push_str(&format!("Labels: {}. Scores in %.\n\n", runs[0].eval.labels));
    md.push_str("| run | n | EM | PM | F1 | numeric |");
    for t in &tables {
        md.push_str(&format!(" EM {t}-table |"));
    }
    md.push_str(" no final line |\n|---|---:|---:|---:|---:|---:|");
    for _ in &tables {
        md.push_str("---:|");
    }
    md.push_str("---:|\n");
    for r in runs {
        let e = &r.eval;
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |",
            r.name,
            e.n,
            pct(e.em),
            pct(e.pm),
            pct(e.f1),
            pct(e.num)
        ));
        for t in &tables {
            md.push_str(&format!(" {} |", e.by_tables.get(t).map_or("-".into(), |b| pct(b.em))));
        }
        md.push_str(&format!(" {} |\n", e.no_final_line));
    }
    md.push_str("\nEM by question kind:\n\n| run |");
    for k in &kinds {
        md.push_str(&format!(" {k} |"));
    }
    md.push_str("\n|---|");
    for _ in &kinds {
        md.push_str("---:|");
    }
    md.push('\n');
    for r in runs {
        md.push_str(&format!("| {} |", r.name));
        for k in &kinds {
            md.push_str(&format!(
                " {} |",
                r.eval.by_kind.get(k).map_or("-".into(), |b| format!("{} (n={})", pct(b.em), b.n))
            ));
        }
        md.push('\n');
    }
    let mut cats = vec!["all".to_string()];
    cats.extend(tables.iter().map(|t| format!("{t} tables")));
    let series: Vec<(String, Vec<f64>)> = runs
        .iter()
        .map(|r| {
            let mut v = vec![r.eval.em];
            v.extend(tables.iter().map(|t| r.eval.by_tables.get(t).map_or(f64::NAN, |b| b.em)));
            (r.name.clone(), v)
        })
        .collect();
    let acc = out.join("accuracy.png");
    bar_chart("EXACT MATCH BY SPLIT", &cats, &series, &acc)
        .map_err(|e| Error::File { path: acc.clone(), message: e.to_string() })?;
    md.push_str("\n![accuracy by split](accuracy.png)\n");
    let curves: Vec<Series> = runs
        .iter()
        .filter_map(|r| {
            let text = std::fs::read_to_string(r.dir.join("metrics.jsonl")).ok()?;
            let points: Vec<(f64, f64)> = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter_map(|v| Some((v.get("step")?.as_f64()?, v.get("loss")?.as_f64()?)))
                .collect();
            (!points.is_empty()).then(|| Series { name: r.name.clone(), points })
        })
        .collect();
    if !curves.is_empty() {
        let png = out.join("training.png");
        line_charts(&[Panel { title: "TRAINING LOSS".into(), x_label: "STEP".into(), series: curves }], &png)
            .map_err(|e| Error::File { path: png.clone(), message: e.to_string() })?;
        md.push_str("\n![training loss](training.png)\n");
    }
    let path = out.join("report.md");
    std::fs::write(&path, &md).map_err(|e| Error::File { path, message: e.to_string() })?;
    Ok(md)
}
