//! A mutational fuzzer over what reads untrusted text: the dataset loaders
//! (MMQA JSON lines and records, Spider, CSV folders), the answer parser and
//! matcher, and the program tracer's SQL parsing and execution.
//!
//! Seeds are real inputs from the bundled sample; each execution applies one
//! to four mutations (byte flips, inserted JSON/CSV/SQL tokens, deletions,
//! duplications, splices of another seed, truncation) chosen by a fixed-seed
//! generator, so a run is reproducible. A finding is a panic, or a call that
//! does not return within the query time limit plus a grace period (a hang;
//! queries are interrupted at their limit). Findings are written to
//! `target/fuzz-findings/` and fail the test.
//!
//! Executions per target: `TABLETRACE_FUZZ_RUNS` (default 20,000 for the
//! loaders, 5× that for the matcher and SQL; ~15 s in all on 2 cores), and
//! `tools/fuzz.sh` runs longer.

use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use tabletrace_data::matching::{
    exact_match, extract_final_answer, normalize, numeric_match, partial_match, says_nothing, score, split_values,
    token_f1,
};
use tabletrace_data::{load, Answer, ExecLimits, LoadOptions, TableDb};
use tabletrace_trace::{parse_query, ProgramTracer, StepCache};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn runs(default: usize) -> usize {
    std::env::var("TABLETRACE_FUZZ_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// xorshift64*: the fuzzer's only source of choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Tokens that break parsers in interesting ways.
const TOKENS: &[&[u8]] = &[
    b"\"",
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\n",
    b"\r\n",
    b"\0",
    b"null",
    b"true",
    b"-1",
    b"0",
    b"1e309",
    b"-0.0",
    b"NaN",
    b"18446744073709551616",
    b"\"\"",
    b"[]",
    b"{}",
    b"\xff",
    b"\xc3",
    b"\xe2\x82",
    b"\xf0\x9f\x98\x80",
    b"'",
    b"''",
    b";",
    b"--",
    b"/*",
    b"*/",
    b"(",
    b")",
    b" SELECT ",
    b" FROM ",
    b" WHERE ",
    b" JOIN ",
    b" ON ",
    b" GROUP BY ",
    b" ORDER BY ",
    b" LIMIT ",
    b" UNION ",
    b" IN (SELECT ",
    b" AS ",
    b" NOT ",
    b" count(*) ",
    b" avg(",
    b" LIKE '%",
    b"%'",
    b" = ",
    b" > ",
    b"T1.",
    b"T2.",
    b"*",
    b"Final answer: ",
    b" | ",
    b" and ",
    b"None",
    b"N/A",
    b"1,234.5",
    b"$",
    b"%",
    b"\t",
    b"\"\"\"",
    b",,",
    b"   ",
];

/// One to four mutations of `seed`, sometimes spliced with `other`.
fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(8) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 | 2 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                v.splice(at..at, t.iter().copied());
            }
            3 if !v.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(v.len());
                v.drain(at.min(end)..end);
            }
            4 if !v.is_empty() => {
                let start = rng.below(v.len());
                let end = (start + 1 + rng.below(64)).min(v.len());
                let chunk = v[start..end].to_vec();
                v.splice(at..at, chunk);
            }
            5 if !other.is_empty() => {
                let start = rng.below(other.len());
                let end = (start + 1 + rng.below(128)).min(other.len());
                v.splice(at..at, other[start..end].iter().copied());
            }
            6 => v.truncate(at),
            _ => {
                // A digit run replaced by an extreme number.
                if let Some(i) = (at..v.len()).find(|&i| v[i].is_ascii_digit()) {
                    let n: &[u8] = [b"99999999999999999999".as_slice(), b"-1", b"0", b"1e-400"][rng.below(4)];
                    v.splice(i..i + 1, n.iter().copied());
                }
            }
        }
    }
    v
}

/// What went wrong on one input.
struct Finding {
    target: &'static str,
    what: String,
    input: Vec<u8>,
}

thread_local! {
    /// Whether this thread is running a fuzzed call (its panics are findings, not test output).
    static FUZZING: Cell<bool> = const { Cell::new(false) };
    /// The last fuzzed call's panic message on this thread.
    static PANIC_MESSAGE: RefCell<String> = const { RefCell::new(String::new()) };
}

/// One process-wide panic hook: a fuzzed call's panic is recorded quietly on
/// its thread; any other panic (other tests run in parallel) prints as usual.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if FUZZING.with(Cell::get) {
                PANIC_MESSAGE.with(|m| *m.borrow_mut() = info.to_string());
            } else {
                default(info);
            }
        }));
    });
}

/// Runs the calls of one target, keeping its panics and hangs and the number of executions.
struct Harness {
    target: &'static str,
    findings: Vec<Finding>,
    execs: usize,
    /// Executions that got past the first parse (a question loaded, an
    /// answer extracted, a query parsed): how deep the mutations reach.
    deep: usize,
    slowest: Duration,
    started: Instant,
}

/// Longest a call may take: the query time limit plus a grace period. Not a
/// speed check: a call beyond it did not terminate on its own.
fn hang_after() -> Duration {
    ExecLimits::default().timeout + Duration::from_secs(20)
}

impl Harness {
    fn new(target: &'static str) -> Harness {
        install_panic_hook();
        Harness { target, findings: Vec::new(), execs: 0, deep: 0, slowest: Duration::ZERO, started: Instant::now() }
    }

    /// Runs `f` on `input`; `f` says whether it got past the first parse.
    fn run(&mut self, input: &[u8], f: impl FnOnce() -> bool) {
        FUZZING.with(|x| x.set(true));
        let t = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(f));
        let took = t.elapsed();
        FUZZING.with(|x| x.set(false));
        self.execs += 1;
        self.deep += usize::from(result.as_ref().is_ok_and(|&deep| deep));
        self.slowest = self.slowest.max(took);
        if result.is_err() {
            let what = format!("panic: {}", PANIC_MESSAGE.with(|m| m.borrow().clone()));
            self.findings.push(Finding { target: self.target, what, input: input.to_vec() });
        } else if took > hang_after() {
            let what = format!("no return for {:.1} s", took.as_secs_f64());
            self.findings.push(Finding { target: self.target, what, input: input.to_vec() });
        }
    }

    /// Prints the counts, writes findings and fails on any.
    fn finish(self) {
        let secs = self.started.elapsed().as_secs_f64();
        eprintln!(
            "fuzz {}: {} executions ({} past the first parse) in {secs:.1} s ({:.0}/s), slowest {:.0} ms, {} findings",
            self.target,
            self.execs,
            self.deep,
            self.execs as f64 / secs.max(1e-9),
            self.slowest.as_secs_f64() * 1e3,
            self.findings.len()
        );
        if self.findings.is_empty() {
            return;
        }
        let dir = root().join("target/fuzz-findings");
        std::fs::create_dir_all(&dir).unwrap();
        for (i, f) in self.findings.iter().enumerate() {
            std::fs::write(dir.join(format!("{}-{i}.bin", f.target)), &f.input).unwrap();
        }
        let first = &self.findings[0];
        panic!(
            "{} findings in {} (inputs in {}); the first: {} on {:?}",
            self.findings.len(),
            first.target,
            dir.display(),
            first.what,
            String::from_utf8_lossy(&first.input)
        );
    }
}

fn lines(path: &Path, n: usize) -> Vec<u8> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().take(n).collect::<Vec<_>>().join("\n").into_bytes()
}

fn first_records(path: &Path, n: usize) -> Vec<u8> {
    let v: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    serde_json::to_vec_pretty(&v.into_iter().take(n).collect::<Vec<_>>()).unwrap()
}

#[test]
fn fuzz_dataset_loaders() {
    let sample = root().join("data/sample");
    let mmqa_lines = lines(&sample.join("mmqa/mmqa_two_table.jsonl"), 3);
    let records = first_records(&sample.join("mmqa/mmqa_two_table_original_records.json"), 2);
    let spider = first_records(&sample.join("spider/train_spider.json"), 3);
    let csv = b"id,name,budget\n1,Treasury,1.5\n2,\"Defense, Dept\",\n3,,-4\n".to_vec();
    let keys =
        br#"{"primary_keys": {"dept": ["id"]}, "foreign_keys": [{"from": "head.dept_id", "to": "dept.id"}]}"#.to_vec();
    let head = b"id,dept_id,age\n1,1,56\n2,3,61\n".to_vec();
    let questions =
        b"{\"id\": 1, \"question\": \"How many?\", \"sql\": \"SELECT count(*) FROM dept\", \"answer\": 3}\n".to_vec();
    let opts = LoadOptions { db_dir: Some(sample.join("spider/database")), ..Default::default() };
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut h = Harness::new("loaders");
    for i in 0..runs(20_000) {
        let (input, path): (Vec<u8>, PathBuf) = match i % 4 {
            0 => (mutate(&mut rng, &mmqa_lines, &records), dir.path().join("q.jsonl")),
            1 => (mutate(&mut rng, &records, &mmqa_lines), dir.path().join("records.json")),
            2 => (mutate(&mut rng, &spider, &records), dir.path().join("spider.json")),
            _ => {
                // A CSV folder: one of its four files mutated.
                let folder = dir.path().join(format!("csv{i}"));
                std::fs::create_dir_all(&folder).unwrap();
                let mut files = [
                    ("dept.csv", csv.clone()),
                    ("head.csv", head.clone()),
                    ("keys.json", keys.clone()),
                    ("questions.jsonl", questions.clone()),
                ];
                let k = rng.below(4);
                files[k].1 = mutate(&mut rng, &files[k].1, &csv);
                for (name, bytes) in &files {
                    std::fs::write(folder.join(name), bytes).unwrap();
                }
                (files[k].1.clone(), folder)
            }
        };
        if path.extension().is_some() {
            std::fs::write(&path, &input).unwrap();
        }
        h.run(&input, || {
            // Loading, then what commands do with a loaded question: open its tables, run its SQL.
            let Ok(ds) = load(&path, &opts) else { return false };
            for q in ds.questions.iter().take(2) {
                if let (Ok(db), Some(sql)) = (TableDb::open(&q.tables), q.gold_sql.as_deref()) {
                    let _ = db.query(sql, &ExecLimits::default());
                }
            }
            !ds.questions.is_empty()
        });
        if path.is_dir() {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
    h.finish();
}

#[test]
fn fuzz_answer_parser_and_matcher() {
    let predictions: Vec<&[u8]> = vec![
        b"Step 1: count the rows.\nFinal answer: 1,234.5",
        b"Final Answer: Treasury, Defense | 3",
        b"The answer is **42%** (approximately).",
        b"final answer - none",
        b"Answer: $1.2 million and 3 heads",
        "Final answer: Zürich; São Paulo; 東京".as_bytes(),
        b"1. Alice\n2. Bob\n3. Carol",
    ];
    let golds = [
        serde_json::json!({"columns": ["n"], "rows": [[1234.5]]}),
        serde_json::json!({"columns": ["name", "n"], "rows": [["Treasury", 3], ["Defense", null]]}),
        serde_json::json!(["Alice", "Bob"]),
        serde_json::json!("42%"),
        serde_json::json!({"columns": [], "rows": []}),
    ];
    let gold_seeds: Vec<Vec<u8>> = golds.iter().map(|g| serde_json::to_vec(g).unwrap()).collect();
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let mut h = Harness::new("matcher");
    for i in 0..runs(20_000) * 5 {
        let p = predictions[i % predictions.len()];
        let other = predictions[rng.below(predictions.len())];
        let text = mutate(&mut rng, p, other);
        let gold_bytes = mutate(&mut rng, &gold_seeds[i % gold_seeds.len()], &gold_seeds[0]);
        let mut input = text.clone();
        input.extend_from_slice(b"\n---gold---\n");
        input.extend_from_slice(&gold_bytes);
        h.run(&input, || {
            let text = String::from_utf8_lossy(&text);
            let _ = normalize(&text);
            let _ = split_values(&text);
            let _ = says_nothing(&text);
            let answer = extract_final_answer(&text);
            let golds: Vec<Answer> = serde_json::from_slice::<serde_json::Value>(&gold_bytes)
                .ok()
                .and_then(|v| Answer::from_json(&v))
                .into_iter()
                .chain(golds.iter().filter_map(Answer::from_json))
                .collect();
            for gold in &golds {
                let prediction = answer.as_deref().unwrap_or(&text);
                let _ = (exact_match(prediction, gold), partial_match(prediction, gold), token_f1(prediction, gold));
                let _ = (numeric_match(prediction, gold, 1e-6), score(prediction, gold), gold.to_line());
                let _ = tabletrace_trace::matches_gold(prediction, gold);
            }
            answer.is_some()
        });
    }
    h.finish();
}

#[test]
fn fuzz_sql_parsing_and_the_program_tracer() {
    let qs = load(&root().join("data/sample/mmqa/mmqa_two_table.jsonl"), &LoadOptions::default()).unwrap().questions;
    let qs: Vec<_> = qs.into_iter().filter(|q| q.gold_sql.is_some()).take(12).collect();
    let seeds: Vec<Vec<u8>> = qs.iter().map(|q| q.gold_sql.clone().unwrap().into_bytes()).collect();
    let dbs: Vec<TableDb> = qs.iter().map(|q| TableDb::open(&q.tables).unwrap()).collect();
    let tracer = ProgramTracer::default();
    let mut rng = Rng(0x94D0_49BB_1331_11EB);
    let mut h = Harness::new("sql");
    for i in 0..runs(20_000) * 5 {
        let k = i % seeds.len();
        let other = rng.below(seeds.len());
        let sql = mutate(&mut rng, &seeds[k], &seeds[other]);
        h.run(&sql, || {
            let sql = String::from_utf8_lossy(&sql);
            let parsed = parse_query(&sql).is_ok();
            let _ = tracer.trace(&dbs[k], &sql, &StepCache::default());
            parsed
        });
    }
    h.finish();
}
