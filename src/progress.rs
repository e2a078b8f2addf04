//! Progress of a long pass, on stderr: an indicatif bar with an ETA on a terminal; elsewhere (a
//! log file, `nohup`, CI) one line at each tenth of the work with the time spent and an estimate
//! of the time left, so that a 50-minute evaluation shows it is alive without a terminal.

use indicatif::{ProgressBar, ProgressStyle};
use std::time::{Duration, Instant};

/// A bar of `len` units drawn with `template` (indicatif's syntax; `{bar:30}` and the like).
pub fn bar(template: &str, len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

/// Progress over `total` units of work: a bar on a terminal, log lines elsewhere.
pub enum Progress {
    Bar(ProgressBar),
    Lines(Tenths),
}

impl Progress {
    /// `template` draws the bar; `what` names the work in the log lines ("eval: the NLL's samples").
    pub fn new(terminal: bool, total: u64, template: &str, what: &str) -> Progress {
        if terminal {
            Progress::Bar(bar(template, total))
        } else {
            Progress::Lines(Tenths::new(what, total))
        }
    }

    /// `done` units of the total are finished. Zero (re)starts the clock: the caller says when
    /// the counted work begins, so that set-up before it is not taken for its pace.
    pub fn set(&mut self, done: u64) {
        match self {
            Progress::Bar(bar) if done == 0 => bar.reset(),
            Progress::Bar(bar) => bar.set_position(done),
            Progress::Lines(tenths) => {
                if let Some(line) = tenths.update(done) {
                    eprintln!("{line}");
                }
            }
        }
    }

    pub fn finish(self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// A log line each time the work passes another tenth of its total.
pub struct Tenths {
    what: String,
    total: u64,
    shown: u64,
    start: Instant,
}

impl Tenths {
    pub fn new(what: &str, total: u64) -> Tenths {
        Tenths {
            what: what.to_string(),
            total,
            shown: 0,
            start: Instant::now(),
        }
    }

    /// The line to print now that `done` units are finished, if a new tenth was passed; none at
    /// zero, which restarts the clock.
    pub fn update(&mut self, done: u64) -> Option<String> {
        if done == 0 {
            self.start = Instant::now();
            return None;
        }
        self.line_at(done, self.start.elapsed())
    }

    /// `update` at a given elapsed time, so that the lines can be tested without waiting.
    fn line_at(&mut self, done: u64, elapsed: Duration) -> Option<String> {
        let tenth = tenths_done(done, self.total);
        if tenth <= self.shown {
            return None;
        }
        self.shown = tenth;
        let spent = elapsed.as_secs_f64();
        // Linear in the units of work: the caller counts units of equal cost (tokens × samples).
        let left = spent * (self.total.saturating_sub(done)) as f64 / done.max(1) as f64;
        Some(format!(
            "{}: {}% after {}, about {} left",
            self.what,
            tenth * 10,
            minutes(spent),
            minutes(left)
        ))
    }
}

/// Whole tenths of `total` that `done` covers, 0..=10 (an empty total is done).
fn tenths_done(done: u64, total: u64) -> u64 {
    if total == 0 {
        return 10;
    }
    (done.min(total) as u128 * 10 / total as u128) as u64
}

fn minutes(secs: f64) -> String {
    if secs < 60.0 {
        format!("{secs:.0} s")
    } else {
        format!("{:.1} min", secs / 60.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenths_are_whole_and_capped() {
        assert_eq!(tenths_done(0, 100), 0);
        assert_eq!(tenths_done(9, 100), 0);
        assert_eq!(tenths_done(10, 100), 1);
        assert_eq!(tenths_done(99, 100), 9);
        assert_eq!(tenths_done(100, 100), 10);
        assert_eq!(tenths_done(250, 100), 10);
        assert_eq!(tenths_done(0, 0), 10);
        assert_eq!(tenths_done(u64::MAX, u64::MAX), 10);
    }

    #[test]
    fn one_line_per_tenth_passed_with_a_linear_estimate() {
        let mut t = Tenths::new("eval", 1000);
        assert_eq!(t.line_at(50, Duration::from_secs(5)), None);
        assert_eq!(
            t.line_at(250, Duration::from_secs(30)).as_deref(),
            Some("eval: 20% after 30 s, about 1.5 min left")
        );
        // The same tenth again, or a jump within it, prints nothing.
        assert_eq!(t.line_at(260, Duration::from_secs(31)), None);
        assert_eq!(t.line_at(299, Duration::from_secs(35)), None);
        assert_eq!(
            t.line_at(1000, Duration::from_secs(600)).as_deref(),
            Some("eval: 100% after 10.0 min, about 0 s left")
        );
        assert_eq!(t.line_at(1000, Duration::from_secs(601)), None);
    }

    #[test]
    fn zero_done_restarts_the_clock() {
        let mut t = Tenths::new("eval", 10);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(t.update(0), None);
        assert!(t.start.elapsed() < Duration::from_millis(200));
    }
}
