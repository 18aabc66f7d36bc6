//! Progress bars on stderr, drawn for the libraries' `Reporter` calls.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tabletrace_data::Reporter;

/// An indicatif bar with rate and ETA; hidden under `--quiet` or when
/// stderr is not a terminal.
pub struct Bar {
    bar: ProgressBar,
}

impl Bar {
    pub fn new(quiet: bool) -> Self {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        if quiet || !std::io::stderr().is_terminal() {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        bar.set_style(
            ProgressStyle::with_template("{msg:24} [{bar:30}] {pos}/{len} {per_sec:>10} eta {eta}")
                .expect("the template is valid")
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        Bar { bar }
    }
}

impl Reporter for Bar {
    fn start(&self, total: u64, label: &str) {
        self.bar.set_length(total);
        self.bar.set_position(0);
        self.bar.set_message(label.to_string());
    }
    fn advance(&self, n: u64) {
        self.bar.inc(n);
    }
    fn message(&self, text: &str) {
        self.bar.set_message(text.to_string());
    }
    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
