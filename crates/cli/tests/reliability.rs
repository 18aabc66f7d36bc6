//! Nothing silently wrong: a signal to `tabletrace run` alone stops its
//! stage too (the trainer saving its steps), one process per run directory,
//! a generator that is down fails its stage, a bad config fails before the
//! first stage, output folders are made or refused before any work.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{root, stderr, tabletrace};

/// A pipeline on the bundled sample: program traces, homogeneous pairs, Q&A SFT.
fn small_pipeline(dir: &Path, generators: &str, train: &str) -> std::path::PathBuf {
    pipeline_with(dir, "data = \"data/sample/mmqa/mmqa_two_table.jsonl\"", generators, train)
}

/// [`small_pipeline`] with these top-level lines instead of `data = …`.
fn pipeline_with(dir: &Path, top: &str, generators: &str, train: &str) -> std::path::PathBuf {
    let cfg = dir.join("pipeline.toml");
    std::fs::write(
        &cfg,
        format!(
            "run_dir = {:?}\n{top}\neval_fraction = 0.1\ntable_tokens = 500\n\
             [traces]\ngenerators = {generators}\n[pairs]\npolicy = \"homogeneous\"\n\
             [train]\nmethods = [\"sft-qa\"]\nmax_length = 768\n{train}\n[eval]\nlimit = 3\nmax_tokens = 16\n",
            dir.join("run").to_str().unwrap()
        ),
    )
    .unwrap();
    cfg
}

fn steps(metrics: &Path) -> Vec<u64> {
    std::fs::read_to_string(metrics)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("step")?.as_u64())
        .collect()
}

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry: look at its state.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

#[test]
fn a_signal_to_run_alone_stops_its_trainer_which_saves_its_steps_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_pipeline(dir.path(), "[\"program\"]", "max_steps = 10\nsave_every = 100");
    let run = dir.path().join("run");
    let metrics = run.join("sft-qa/metrics.jsonl");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tabletrace"));
    cmd.args(["run", cfg.to_str().unwrap(), "--to", "train", "--quiet"])
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // A test harness started in the background (`cmd &` in a script) runs
    // with SIGINT ignored, and tabletrace keeps an inherited ignore; this
    // test is about a user's Ctrl-C or kill -INT, so the run starts with the
    // default disposition.
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut parent = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    while steps(&metrics).len() < 2 {
        assert!(Instant::now() < deadline, "no training step after 600 s");
        assert!(parent.try_wait().unwrap().is_none(), "the run ended before it could be stopped");
        std::thread::sleep(Duration::from_millis(100));
    }
    // One writer per directory: a second run on it is refused.
    let o = tabletrace(&["run", cfg.to_str().unwrap(), "--to", "train", "--quiet"]);
    assert!(!o.status.success() && stderr(&o).contains("is in use by tabletrace run (process"), "{}", stderr(&o));
    let lock = std::fs::read_to_string(run.join("sft-qa/.tabletrace.lock")).unwrap();
    let trainer: u32 = lock.split("process ").nth(1).unwrap().trim_end_matches([')', '\n']).parse().unwrap();
    assert!(alive(trainer), "{lock}");

    // SIGINT to the parent alone (not its process group).
    let kill = Command::new("kill").args(["-INT", &parent.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let status = parent.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(parent.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(err.contains("stopped by SIGINT during stage train"), "{err}");
    assert!(!alive(trainer), "the trainer outlived the run that started it");
    let done = steps(&metrics);
    assert!(done.len() < 10, "the trainer ran to the end instead of stopping: {done:?}");
    let saved = run.join(format!("sft-qa/checkpoints/step-{}", done.len()));
    assert!(saved.is_dir(), "the stopped trainer saved no checkpoint of its {} steps", done.len());

    // The same command resumes from that checkpoint and finishes.
    let o = tabletrace(&["run", cfg.to_str().unwrap(), "--to", "train", "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("starting afresh"), "{}", stderr(&o));
    assert_eq!(steps(&metrics), (1..=10).collect::<Vec<u64>>());
}

#[test]
fn a_generator_that_is_down_fails_the_traces_stage_which_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port(); // closed again
    let generators = format!("[\"program\", \"http:http://127.0.0.1:{port}/v1#x\"]");
    let cfg = small_pipeline(dir.path(), &generators, "max_steps = 1");
    std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap().replace("[traces]\n", "[traces]\nllm_questions = 2\n"))
        .unwrap();
    let o = tabletrace(&["run", cfg.to_str().unwrap(), "--to", "pairs", "--quiet"]);
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("http:x: all 6 calls failed") && err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(!dir.path().join("run/.traces.done").exists(), "a failed stage is not marked done");
    assert!(!dir.path().join("run/pairs/pairs.jsonl").exists());
}

#[test]
fn config_mistakes_fail_before_the_first_stage() {
    let dir = tempfile::tempdir().unwrap();
    let data = "data = \"data/sample/mmqa/mmqa_two_table.jsonl\"";
    let run = dir.path().join("run");
    let cases = [
        (format!("{data}\nmodel = \"smollm3-1b\""), "[\"program\"]", "config: model: smollm3-1b"),
        (
            format!("{data}\ntrain_split = \"trian\"\neval_split = \"val\""),
            "[\"program\"]",
            "config: train_split: \"trian\"",
        ),
        (data.to_string(), "[\"program\", \"local:no-such-model\"]", "config: traces.generators: local:no-such-model"),
        (
            "data = \"data/sample/nope.jsonl\"".to_string(),
            "[\"program\"]",
            "config: data: data/sample/nope.jsonl does not exist",
        ),
    ];
    for (top, generators, want) in cases {
        let cfg = pipeline_with(dir.path(), &top, generators, "max_steps = 1");
        let o = tabletrace(&["run", cfg.to_str().unwrap(), "--quiet"]);
        assert_eq!(o.status.code(), Some(2), "{want}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "want {want:?}, got {}", stderr(&o));
        assert!(!run.join("traces").exists(), "{want}: a stage ran before the config was checked");
    }
    // A split the data does not hold is named as such, with the splits it has.
    let cfg = pipeline_with(
        dir.path(),
        "data = \"data/sample/mmqa\"\ntrain_split = \"train\"\neval_split = \"test\"",
        "[\"program\"]",
        "max_steps = 1",
    );
    let o = tabletrace(&["run", cfg.to_str().unwrap(), "--quiet"]);
    let err = stderr(&o);
    assert!(
        err.contains("eval_split = \"test\"") && err.contains("has no question of that split (it has: none 21, train"),
        "{err}"
    );
    // run_dir is a file.
    std::fs::remove_dir_all(&run).unwrap();
    std::fs::write(&run, "x").unwrap();
    let o = tabletrace(&["run", small_pipeline(dir.path(), "[\"program\"]", "max_steps = 1").to_str().unwrap()]);
    assert!(stderr(&o).contains("is a file, not a folder"), "{}", stderr(&o));
}

#[test]
fn output_folders_are_made_before_the_work_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("new/deeper/traces.jsonl");
    let data = "data/sample/mmqa/mmqa_two_table.jsonl";
    let o = tabletrace(&["traces", "--data", data, "--limit", "2", "--out", out.to_str().unwrap(), "--quiet"]);
    assert!(o.status.success() && out.is_file(), "{}", stderr(&o));
    let pairs = dir.path().join("other/pairs.jsonl");
    let o = tabletrace(&["pairs", "--traces", out.to_str().unwrap(), "--data", data, "--out", pairs.to_str().unwrap()]);
    assert!(o.status.success() && pairs.is_file(), "{}", stderr(&o));
    // A folder given as the output file is refused before any work.
    let o = tabletrace(&["traces", "--data", data, "--limit", "2", "--out", dir.path().to_str().unwrap(), "--quiet"]);
    assert!(stderr(&o).contains("is a folder: give a file path"), "{}", stderr(&o));
}
