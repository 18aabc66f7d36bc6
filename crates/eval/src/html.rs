//! `report.html`: one self-contained page (no network, no external file)
//! to browse a report: the results with each run's difference from the
//! baseline and its interval, charts as inline SVG, every evaluated
//! question with the prompt as the model saw it (tables included) and each
//! run's answer — filterable by table count, question kind, subset and which
//! run got it right — and preference pairs with chosen and rejected side by
//! side, the first line where they diverge marked.
//!
//! The filters live in the URL's fragment (`#tables=2&kind=count&subset=
//! unseen_sql&run=1&result=right`), so a filtered view can be linked to and
//! the page is tested by loading such a link in a headless browser.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use crate::report::{compare, Comparison, Run, Scored};
use crate::{Error, Prediction, Result};

/// Pairs shown at most (the page says how many there were).
pub const MAX_PAIRS: usize = 300;

/// HTML-escapes text for element content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn pct(v: f64) -> String {
    format!("{:.1}", v * 100.0)
}

/// Distinct colours for up to eight runs (then repeated).
const COLOURS: [&str; 8] = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"];

fn read_predictions(dir: &Path) -> Result<Vec<Prediction>> {
    let path = dir.join("predictions.jsonl");
    let text =
        std::fs::read_to_string(&path).map_err(|e| Error::File { path: path.clone(), message: e.to_string() })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| Error::File { path: path.clone(), message: format!("line {}: {e}", i + 1) })
        })
        .collect()
}

/// Five horizontal grid lines from 0 to `max` across `left..w`, each with
/// its tick label; `y` maps a value to its height.
fn grid_lines(svg: &mut String, left: f64, w: f64, max: f64, y: impl Fn(f64) -> f64, label: impl Fn(f64) -> String) {
    for k in 0..=4 {
        let v = max * k as f64 / 4.0;
        let _ = write!(
            svg,
            "<line x1=\"{left}\" x2=\"{w}\" y1=\"{0:.1}\" y2=\"{0:.1}\" class=\"grid\"/><text x=\"{1}\" y=\"{2:.1}\" \
             class=\"tick\">{3}</text>",
            y(v),
            left - 4.0,
            y(v) + 4.0,
            label(v)
        );
    }
}

/// A grouped bar chart of EM per column (all, subsets, sets), one bar per run.
fn em_chart(runs: &[Run], columns: &[String], rows: &[Vec<Scored>]) -> String {
    let (w, h, left, bottom, top) = (760.0, 260.0, 40.0, 40.0, 20.0);
    let max = rows.iter().flatten().map(|s| s.em).fold(0.0f64, f64::max).max(0.05);
    let max = (max * 10.0).ceil() / 10.0;
    let group = (w - left) / columns.len().max(1) as f64;
    let bar = group * 0.8 / runs.len().max(1) as f64;
    let y = |v: f64| top + (h - top - bottom) * (1.0 - v / max);
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"exact match by question set\">"
    );
    grid_lines(&mut svg, left, w, max, y, |v| {
        if max < 0.2 {
            format!("{:.1}", v * 100.0)
        } else {
            format!("{:.0}", v * 100.0)
        }
    });
    for (c, name) in columns.iter().enumerate() {
        let x0 = left + c as f64 * group + group * 0.1;
        for (r, scores) in rows.iter().enumerate() {
            let s = &scores[c];
            let x = x0 + r as f64 * bar;
            let _ = write!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{}: {} EM {}% \
                 (n={})</title></rect>",
                y(s.em),
                bar * 0.92,
                (h - bottom - y(s.em)).max(0.0),
                COLOURS[r % COLOURS.len()],
                esc(&runs[r].name),
                esc(name),
                pct(s.em),
                s.n
            );
        }
        let _ =
            write!(svg, "<text x=\"{:.1}\" y=\"{}\" class=\"label\">{}</text>", x0 + group * 0.4, h - 22.0, esc(name));
    }
    for (r, run) in runs.iter().enumerate() {
        let x = left + r as f64 * 120.0;
        let _ = write!(
            svg,
            "<rect x=\"{x}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"{}\" \
             class=\"legend\">{}</text>",
            h - 12.0,
            COLOURS[r % COLOURS.len()],
            x + 14.0,
            h - 3.0,
            esc(&run.name)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// Training loss per step of the trained runs, one line each.
fn loss_chart(runs: &[Run]) -> Option<String> {
    let curves: Vec<(usize, Vec<(f64, f64)>)> = runs
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let text = std::fs::read_to_string(r.dir.join("metrics.jsonl")).ok()?;
            let points: Vec<(f64, f64)> = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter_map(|v| Some((v.get("step")?.as_f64()?, v.get("loss")?.as_f64()?)))
                .filter(|(_, l)| l.is_finite())
                .collect();
            (!points.is_empty()).then_some((i, points))
        })
        .collect();
    if curves.is_empty() {
        return None;
    }
    let (w, h, left, bottom, top) = (760.0, 220.0, 40.0, 24.0, 10.0);
    let all = curves.iter().flat_map(|(_, p)| p.iter());
    let (xmax, ymax) = all.fold((1.0f64, 0.0f64), |(x, y), p| (x.max(p.0), y.max(p.1)));
    let ymax = ymax.max(1e-9);
    let px = |x: f64| left + (w - left - 10.0) * x / xmax;
    let py = |y: f64| top + (h - top - bottom) * (1.0 - y / ymax);
    let mut svg =
        format!("<svg class=\"chart\" viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"training loss by step\">");
    grid_lines(&mut svg, left, w, ymax, py, |v| format!("{v:.2}"));
    for (i, points) in &curves {
        let path: Vec<String> = points.iter().map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y))).collect();
        let _ = write!(
            svg,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\"><title>{}</title></polyline>",
            path.join(" "),
            COLOURS[i % COLOURS.len()],
            esc(&runs[*i].name)
        );
    }
    let _ = write!(svg, "<text x=\"{}\" y=\"{}\" class=\"label\">step (last {xmax:.0})</text></svg>", w / 2.0, h - 4.0);
    Some(svg)
}

fn results_table(runs: &[Run], base: &str, columns: &[String], rows: &[Vec<Scored>]) -> String {
    let mut t = String::from("<table class=\"results\"><thead><tr><th>run</th><th>n</th><th>EM</th><th>PM</th>");
    t.push_str("<th>F1</th><th>numeric</th><th>no final line</th><th>not run</th>");
    for c in columns.iter().skip(1) {
        let _ = write!(t, "<th>EM {} (n)</th>", esc(c));
    }
    for c in columns {
        let _ = write!(t, "<th>Δ {} vs {} [95% CI]</th>", esc(c), esc(base));
    }
    t.push_str("</tr></thead><tbody>");
    for (r, scores) in runs.iter().zip(rows) {
        let e = &r.eval;
        let _ = write!(
            t,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
            esc(&r.name),
            e.n,
            pct(e.em),
            pct(e.pm),
            pct(e.f1),
            pct(e.num),
            e.no_final_line,
            e.not_run
        );
        for s in scores.iter().skip(1) {
            let _ = write!(t, "<td>{} ({})</td>", pct(s.em), s.n);
        }
        for s in scores {
            match &s.vs_baseline {
                Some(d) => {
                    let class = if d.lo > 0.0 {
                        "up"
                    } else if d.hi < 0.0 {
                        "down"
                    } else {
                        "flat"
                    };
                    let _ = write!(
                        t,
                        "<td class=\"{class}\">{:+.1} [{:+.1}, {:+.1}] +{}/−{}</td>",
                        d.diff * 100.0,
                        d.lo * 100.0,
                        d.hi * 100.0,
                        d.wins,
                        d.losses
                    );
                }
                None => t.push_str("<td>–</td>"),
            }
        }
        t.push_str("</tr>");
    }
    t.push_str("</tbody></table>");
    t
}

/// Every question of the main evaluation, with each run's answer.
fn questions_section(runs: &[Run], per_run: &[Vec<Prediction>], cmp: &Comparison) -> String {
    let mut order: Vec<&str> = Vec::new();
    let mut by_id: BTreeMap<&str, Vec<Option<&Prediction>>> = BTreeMap::new();
    for (r, preds) in per_run.iter().enumerate() {
        for p in preds {
            let slot = by_id.entry(p.id.as_str()).or_insert_with(|| {
                order.push(p.id.as_str());
                vec![None; runs.len()]
            });
            slot[r] = Some(p);
        }
    }
    let mut tables = BTreeSet::new();
    let mut kinds = BTreeSet::new();
    let mut items = String::new();
    for id in &order {
        let preds = &by_id[id];
        let first = preds.iter().flatten().next().expect("every id came from a prediction");
        let kind =
            serde_json::to_value(first.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        tables.insert(first.n_tables);
        kinds.insert(kind.clone());
        let subsets: Vec<&str> =
            cmp.subsets.iter().filter(|(_, ids)| ids.contains(*id)).map(|(n, _)| n.as_str()).collect();
        let right: Vec<String> =
            preds.iter().enumerate().filter(|(_, p)| p.is_some_and(|p| p.em)).map(|(i, _)| i.to_string()).collect();
        let _ = write!(
            items,
            "<details class=\"q\" data-tables=\"{}\" data-kind=\"{}\" data-subsets=\"{}\" data-right=\"{}\"><summary>\
             <code>{}</code> · {} tables · {}{} ",
            first.n_tables,
            esc(&kind),
            esc(&subsets.join(" ")),
            right.join(" "),
            esc(id),
            first.n_tables,
            esc(&kind),
            if subsets.is_empty() { String::new() } else { format!(" · {}", esc(&subsets.join(", "))) }
        );
        for (r, p) in preds.iter().enumerate() {
            let (mark, class) = match p {
                Some(p) if p.em => ("✓", "right"),
                Some(_) => ("✗", "wrong"),
                None => ("–", "absent"),
            };
            let _ = write!(items, "<span class=\"badge {class}\" title=\"{}\">{mark}</span>", esc(&runs[r].name));
        }
        let _ = write!(items, "</summary><p><b>gold</b>: {}</p><table class=\"answers\">", esc(&first.gold));
        for (r, p) in preds.iter().enumerate() {
            match p {
                Some(p) => {
                    let note =
                        p.not_run.as_deref().map(|w| format!(" <i>(not run: {})</i>", esc(w))).unwrap_or_default();
                    let _ = write!(
                        items,
                        "<tr class=\"{}\"><td>{}</td><td>{}{note}<details><summary>output</summary><pre>{}</pre>\
                         </details></td></tr>",
                        if p.em { "right" } else { "wrong" },
                        esc(&runs[r].name),
                        esc(&p.answer),
                        esc(&p.output)
                    );
                }
                None => {
                    let _ = write!(items, "<tr><td>{}</td><td>not evaluated</td></tr>", esc(&runs[r].name));
                }
            }
        }
        let _ = write!(
            items,
            "</table><details><summary>prompt as the model saw it (tables included)</summary><pre>{}</pre></details>\
             </details>",
            esc(&first.prompt)
        );
    }
    let mut s = String::from("<div class=\"filters\" id=\"q-filters\"><label>tables <select id=\"f-tables\">");
    s.push_str("<option value=\"\">any</option>");
    for t in &tables {
        let _ = write!(s, "<option value=\"{t}\">{t}</option>");
    }
    s.push_str("</select></label> <label>kind <select id=\"f-kind\"><option value=\"\">any</option>");
    for k in &kinds {
        let _ = write!(s, "<option value=\"{0}\">{0}</option>", esc(k));
    }
    s.push_str("</select></label> <label>subset <select id=\"f-subset\"><option value=\"\">all questions</option>");
    for (n, _) in &cmp.subsets {
        let _ = write!(s, "<option value=\"{0}\">{0}</option>", esc(n));
    }
    s.push_str("</select></label> <label>run <select id=\"f-run\">");
    for (i, r) in runs.iter().enumerate() {
        let _ = write!(s, "<option value=\"{i}\">{}</option>", esc(&r.name));
    }
    s.push_str(
        "</select></label> <label>got it <select id=\"f-result\"><option value=\"\">either</option><option \
         value=\"right\">right</option><option value=\"wrong\">wrong</option></select></label> \
         <span id=\"q-count\"></span></div>",
    );
    s.push_str(&items);
    s
}

/// The text of a TRL row's field: a string, or the last message's content.
fn row_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(msgs) => {
            msgs.last().and_then(|m| m.get("content")).and_then(|c| c.as_str()).unwrap_or_default().to_string()
        }
        _ => String::new(),
    }
}

/// Lines of a trace, the first one that differs from `other`'s marked.
fn trace_lines(text: &str, other: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (text.lines().collect(), other.lines().collect());
    let first_diff = (0..a.len()).find(|&i| b.get(i).is_none_or(|o| o.trim() != a[i].trim()));
    let mut out = String::from("<ol>");
    for (i, line) in a.iter().enumerate() {
        if Some(i) == first_diff {
            let _ = write!(out, "<li class=\"diverge\"><mark>{}</mark></li>", esc(line));
        } else {
            let _ = write!(out, "<li>{}</li>", esc(line));
        }
    }
    out.push_str("</ol>");
    out
}

fn pairs_section(path: &Path) -> Result<String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| Error::File { path: path.to_path_buf(), message: e.to_string() })?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut types = BTreeSet::new();
    let mut items = String::new();
    for (i, line) in lines.iter().take(MAX_PAIRS).enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::File { path: path.to_path_buf(), message: format!("line {}: {e}", i + 1) })?;
        let meta = &v["metadata"];
        let error = meta["error_type"].as_str().unwrap_or("none").to_string();
        types.insert(error.clone());
        let (chosen, rejected) = (row_text(&v["chosen"]), row_text(&v["rejected"]));
        let faith = |k: &str| meta[k].as_f64().map_or("–".to_string(), |f| format!("{f:.2}"));
        let _ = write!(
            items,
            "<details class=\"pair\" data-error=\"{}\"><summary><code>{}</code> · error: {} · chosen {} \
             (faithfulness {}) vs rejected {} (faithfulness {})</summary><details><summary>prompt</summary><pre>{}</pre>\
             </details><div class=\"side\"><div><h4>chosen</h4>{}</div><div><h4>rejected</h4>{}</div></div></details>",
            esc(&error),
            esc(meta["question_id"].as_str().unwrap_or("?")),
            esc(&error),
            esc(meta["chosen_generator"].as_str().unwrap_or("?")),
            faith("chosen_faithfulness"),
            esc(meta["rejected_generator"].as_str().unwrap_or("?")),
            faith("rejected_faithfulness"),
            esc(&row_text(&v["prompt"])),
            trace_lines(&chosen, &rejected),
            trace_lines(&rejected, &chosen)
        );
    }
    let mut s = format!(
        "<p>{} of {} pairs of <code>{}</code>; the first line where chosen and rejected differ is marked.</p>\
         <div class=\"filters\"><label>error type <select id=\"f-error\"><option value=\"\">any</option>",
        lines.len().min(MAX_PAIRS),
        lines.len(),
        esc(&path.display().to_string())
    );
    for t in &types {
        let _ = write!(s, "<option value=\"{0}\">{0}</option>", esc(t));
    }
    s.push_str("</select></label> <span id=\"p-count\"></span></div>");
    s.push_str(&items);
    Ok(s)
}

const STYLE: &str =
    "body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 12px}\
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}\
td:first-child,th:first-child{text-align:left}.up{background:#dff0d8}.down{background:#f2dede}\
.chart{width:100%;max-width:760px;display:block;margin:8px 0}.grid{stroke:#e4e4e4}.tick{font-size:10px;text-anchor:end}\
.label{font-size:11px;text-anchor:middle}.legend{font-size:11px}details.q,details.pair{border-bottom:1px solid #eee;\
padding:3px 0}pre{white-space:pre-wrap;background:#f7f7f7;padding:6px;max-height:420px;overflow:auto;font-size:12px}\
.badge{display:inline-block;width:1.3em;text-align:center;border-radius:3px;margin-left:2px}\
.badge.right{background:#55a868;color:#fff}.badge.wrong{background:#eee;color:#999}.badge.absent{color:#bbb}\
table.answers td{text-align:left;vertical-align:top}tr.right td:first-child{border-left:4px solid #55a868}\
.filters{position:sticky;top:0;background:#fff;padding:6px 0;border-bottom:1px solid #ddd;z-index:1}\
.side{display:grid;grid-template-columns:1fr 1fr;gap:12px}.side ol{font-size:12px;padding-left:22px}\
li.diverge mark{background:#ffe08a}";

/// The filters: read from and written to the URL's fragment.
const SCRIPT: &str = r#"(function () {
  var ids = ['tables', 'kind', 'subset', 'run', 'result', 'error'];
  function el(id) { return document.getElementById('f-' + id); }
  function apply() {
    var f = {};
    ids.forEach(function (k) { f[k] = el(k) ? el(k).value : ''; });
    var shown = 0, all = 0;
    document.querySelectorAll('details.q').forEach(function (q) {
      var right = q.dataset.right.split(' ').indexOf(f.run) >= 0;
      var ok = (!f.tables || q.dataset.tables === f.tables) && (!f.kind || q.dataset.kind === f.kind) &&
        (!f.subset || q.dataset.subsets.split(' ').indexOf(f.subset) >= 0) &&
        (!f.result || (f.result === 'right') === right);
      q.hidden = !ok; all += 1; shown += ok ? 1 : 0;
    });
    var qc = document.getElementById('q-count');
    if (qc) { qc.textContent = shown + ' of ' + all + ' questions shown'; qc.dataset.shown = shown; }
    var pshown = 0, pall = 0;
    document.querySelectorAll('details.pair').forEach(function (p) {
      var ok = !f.error || p.dataset.error === f.error;
      p.hidden = !ok; pall += 1; pshown += ok ? 1 : 0;
    });
    var pc = document.getElementById('p-count');
    if (pc) { pc.textContent = pshown + ' of ' + pall + ' pairs shown'; pc.dataset.shown = pshown; }
    var hash = ids.filter(function (k) { return f[k]; }).map(function (k) {
      return k + '=' + encodeURIComponent(f[k]);
    }).join('&');
    if (hash !== location.hash.slice(1)) { history.replaceState(null, '', hash ? '#' + hash : location.pathname); }
  }
  location.hash.slice(1).split('&').forEach(function (kv) {
    var i = kv.indexOf('=');
    if (i > 0 && el(kv.slice(0, i))) { el(kv.slice(0, i)).value = decodeURIComponent(kv.slice(i + 1)); }
  });
  ids.forEach(function (k) { if (el(k)) { el(k).addEventListener('change', apply); } });
  apply();
})();"#;

/// Writes `report.html` for `runs` into `out`: results, comparison with the
/// baseline (as [`compare`] gives it), charts, questions, and the pairs in
/// `pairs` (a TRL JSONL file, the first [`MAX_PAIRS`]) when given.
pub fn write_html(runs: &[Run], cmp: &Comparison, pairs: Option<&Path>, out: &Path) -> Result<()> {
    let (base, columns, rows) = compare(runs, cmp)?;
    let per_run: Vec<Vec<Prediction>> = runs.iter().map(|r| read_predictions(&r.dir)).collect::<Result<_>>()?;
    let mut page = String::from("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">");
    let _ = write!(page, "<title>tabletrace report</title><style>{STYLE}</style></head><body>");
    let _ = write!(
        page,
        "<h1>tabletrace report</h1><p>Labels: {}. Scores in %. Δ: a run's EM minus {}'s on the same questions, with its \
         paired bootstrap 95% interval and the questions only the run (+) or only {} (−) got right; green when the \
         interval is above zero, red when below.</p>",
        esc(&runs[0].eval.labels),
        esc(&base),
        esc(&base)
    );
    page.push_str("<h2>Results</h2>");
    page.push_str(&results_table(runs, &base, &columns, &rows));
    page.push_str("<h2>Exact match by question set</h2>");
    page.push_str(&em_chart(runs, &columns, &rows));
    if let Some(svg) = loss_chart(runs) {
        page.push_str("<h2>Training loss</h2>");
        page.push_str(&svg);
    }
    page.push_str("<h2 id=\"questions\">Questions</h2>");
    page.push_str(&questions_section(runs, &per_run, cmp));
    if let Some(p) = pairs {
        page.push_str("<h2 id=\"pairs\">Preference pairs</h2>");
        page.push_str(&pairs_section(p)?);
    }
    let _ = write!(page, "<script>{SCRIPT}</script></body></html>");
    let path = out.join("report.html");
    std::fs::write(&path, page).map_err(|e| Error::File { path, message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_the_divergent_line_is_marked() {
        assert_eq!(esc("<b a=\"x\">&'"), "&lt;b a=&quot;x&quot;&gt;&amp;&#39;");
        let chosen = "Step 1: read t.\nStep 2: 3 rows.\nFinal answer: 3";
        let rejected = "Step 1: read t.\nStep 2: 4 rows.\nFinal answer: 4";
        let html = trace_lines(chosen, rejected);
        assert!(
            html.contains("<li>Step 1: read t.</li><li class=\"diverge\"><mark>Step 2: 3 rows.</mark></li>"),
            "{html}"
        );
        assert_eq!(html.matches("diverge").count(), 1);
        // A trace that only adds lines diverges at its first extra line.
        assert!(trace_lines("a\nb", "a").contains("<mark>b</mark>"));
        assert_eq!(row_text(&serde_json::json!([{"role": "user", "content": "hi"}])), "hi");
    }
}
