//! Progress on stderr for the libraries' `Reporter` calls: an indicatif bar
//! with rate and ETA on a terminal; plain lines (every 30 s, with rate and
//! ETA) when stderr is a file, as for runs under `nohup`; nothing under
//! `--quiet`.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tabletrace_data::Reporter;

/// Seconds between plain progress lines.
const PLAIN_EVERY: Duration = Duration::from_secs(30);

/// What a plain progress line needs.
struct Plain {
    label: String,
    total: u64,
    done: u64,
    started: Instant,
    printed: Instant,
}

/// A progress display (see the module note).
pub struct Bar {
    bar: ProgressBar,
    plain: Option<Mutex<Plain>>,
}

impl Bar {
    pub fn new(quiet: bool) -> Self {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        let terminal = std::io::stderr().is_terminal();
        if quiet || !terminal {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        bar.set_style(
            ProgressStyle::with_template("{msg:24} [{bar:30}] {pos}/{len} {per_sec:>10} eta {eta}")
                .expect("the template is valid")
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        let plain = (!quiet && !terminal).then(|| {
            let now = Instant::now();
            Mutex::new(Plain { label: String::new(), total: 0, done: 0, started: now, printed: now })
        });
        Bar { bar, plain }
    }
}

/// `"40/325 (0.21/s, eta 22 min)"`.
fn plain_line(p: &Plain) -> String {
    let secs = p.started.elapsed().as_secs_f64().max(1e-9);
    let rate = p.done as f64 / secs;
    let eta = if p.done > 0 && p.total > p.done {
        let left = (p.total - p.done) as f64 / rate;
        if left >= 90.0 {
            format!(", eta {:.0} min", left / 60.0)
        } else {
            format!(", eta {left:.0} s")
        }
    } else {
        String::new()
    };
    format!("{}: {}/{} ({rate:.2}/s{eta})", p.label, p.done, p.total)
}

impl Reporter for Bar {
    fn start(&self, total: u64, label: &str) {
        self.bar.set_length(total);
        self.bar.set_position(0);
        self.bar.set_message(label.to_string());
        if let Some(p) = &self.plain {
            let mut p = p.lock().expect("progress state");
            let now = Instant::now();
            *p = Plain { label: label.to_string(), total, done: 0, started: now, printed: now };
        }
    }
    fn advance(&self, n: u64) {
        self.bar.inc(n);
        if let Some(p) = &self.plain {
            let mut p = p.lock().expect("progress state");
            p.done += n;
            if p.printed.elapsed() >= PLAIN_EVERY {
                p.printed = Instant::now();
                eprintln!("{}", plain_line(&p));
            }
        }
    }
    fn message(&self, text: &str) {
        self.bar.set_message(text.to_string());
        if let Some(p) = &self.plain {
            p.lock().expect("progress state").label = text.to_string();
        }
    }
    fn finish(&self) {
        self.bar.finish_and_clear();
        if let Some(p) = &self.plain {
            let p = p.lock().expect("progress state");
            if p.total > 0 {
                eprintln!("{} in {:.0} s", plain_line(&p), p.started.elapsed().as_secs_f64());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_give_rate_and_eta() {
        let started = Instant::now() - Duration::from_secs(100);
        let p = Plain { label: "eval".into(), total: 325, done: 25, started, printed: started };
        let line = plain_line(&p);
        assert!(line.starts_with("eval: 25/325 (0.25/s, eta 20 min)"), "{line}");
        let p = Plain { done: 320, ..p };
        assert!(plain_line(&p).ends_with("eta 2 s)"), "{}", plain_line(&p));
    }
}
