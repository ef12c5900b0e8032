//! PASS/FAIL reporting of the VM tier's guest programs (std only). tests/vm/run.sh counts the
//! `PASS: ` and `FAIL: ` lines this prints; `INFO: ` (figures) and `SKIP: ` (a check this run
//! cannot make) lines are not checks and are not counted.

use std::process::ExitCode;
use std::time::Instant;

#[derive(Default)]
pub struct Report {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

impl Report {
    /// Prints `PASS: name (note)` or `FAIL: name: why`; true if it passed.
    pub fn check(&mut self, name: &str, r: std::result::Result<String, String>) -> bool {
        match r {
            Ok(note) if note.is_empty() => println!("PASS: {name}"),
            Ok(note) => println!("PASS: {name} ({note})"),
            Err(why) => {
                self.failed += 1;
                println!("FAIL: {name}: {why}");
                return false;
            }
        }
        self.passed += 1;
        true
    }

    /// Prints `INFO: name: text`: figures for the log, not a check.
    pub fn info(&self, name: &str, text: &str) {
        println!("INFO: {name}: {text}");
    }

    /// Prints `SKIP: name: why`: a check this run cannot make (counted apart, never as passed).
    pub fn skip(&mut self, name: &str, why: &str) {
        self.skipped += 1;
        println!("SKIP: {name}: {why}");
    }

    /// Prints `program: N passed, M failed, K skipped in S s` (time since `t0`); the program's exit status
    /// (failure if any check failed).
    pub fn finish(&self, program: &str, t0: Instant) -> ExitCode {
        println!(
            "{program}: {} passed, {} failed, {} skipped in {:.1} s",
            self.passed,
            self.failed,
            self.skipped,
            t0.elapsed().as_secs_f64()
        );
        if self.failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

/// How `got` differs from the bytes `want(i)`: None where every byte matches, otherwise "N of M
/// bytes differ (first at +i: 0xgg, expected 0xww)".
pub fn differences(got: &[u8], want: impl Fn(usize) -> u8) -> Option<String> {
    let mut wrong = (0..got.len()).filter(|&i| got[i] != want(i));
    let first = wrong.next()?;
    Some(format!(
        "{} of {} bytes differ (first at +{first:#x}: {:#04x}, expected {:#04x})",
        1 + wrong.count(),
        got.len(),
        got[first],
        want(first)
    ))
}
