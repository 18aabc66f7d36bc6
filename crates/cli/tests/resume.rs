//! End to end against a real OpenAI-compatible server (llama.cpp's, from
//! llama-cpp-python, installed by scripts/setup.sh) on 127.0.0.1 serving the
//! SmolLM2 GGUF: `tabletrace traces` killed with SIGKILL in the middle of a
//! run, then started again, finishes with every request answered once.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tabletrace_trace::CallCache;

use crate::{root, stderr};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server() -> (Server, u16) {
    let home = tabletrace_model::cache_dir();
    let python = home.join("venv-llama/bin/python");
    let gguf = home.join("models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        python.is_file(),
        "{} is missing: run scripts/setup.sh (it builds llama-cpp-python once)",
        python.display()
    );
    assert!(gguf.is_file(), "{} is missing: run scripts/fetch-models.sh", gguf.display());
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(python)
        .args(["-m", "llama_cpp.server", "--model", gguf.to_str().unwrap(), "--host", "127.0.0.1"])
        .args(["--port", &port.to_string(), "--n_ctx", "4096", "--n_threads", "1", "--model_alias", "smollm2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the llama.cpp server starts");
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
            let mut reply = String::new();
            let _ = s.read_to_string(&mut reply);
            if reply.starts_with("HTTP/1.1 200") {
                return (server, port);
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!("the llama.cpp server did not answer on port {port} within 120 s");
}

/// `traces` of the first `limit` sample questions through the server.
fn traces_cmd(port: u16, out: &Path, limit: usize) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tabletrace"));
    c.current_dir(root()).args([
        "traces",
        "--data",
        "data/sample/mmqa/mmqa_two_table.jsonl",
        "--generator",
        &format!("http:http://127.0.0.1:{port}#smollm2"),
        "--limit",
        &limit.to_string(),
        "--negatives",
        "1",
        "--max-tokens",
        "24",
        "--concurrency",
        "1",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    c
}

#[test]
fn killed_run_resumes_without_repeating_requests() {
    let (_server, port) = start_server();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("traces.jsonl");
    let cache_path = dir.path().join("llm_cache.sqlite");

    // First run: killed (SIGKILL) once two answers are stored.
    let mut child = traces_cmd(port, &out, 6).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let stored = CallCache::open(&cache_path).map(|c| c.len()).unwrap_or(0);
        if stored >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no answers stored after 300 s");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let stored = CallCache::open(&cache_path).unwrap().len();
    assert!((2..12).contains(&stored), "{stored} answers stored at the kill");
    assert!(!out.exists(), "no partial output is left: it is written atomically at the end");

    // Second run: finishes, asking only for what the first did not store.
    let o = traces_cmd(port, &out, 6).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains(&format!("12 requests, {stored} from the cache")), "{err}");
    assert!(err.contains("0 failed"), "{err}");
    assert_eq!(CallCache::open(&cache_path).unwrap().len(), 12);
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 12, "6 questions, one positive and one negative each");
    let mut keys: Vec<String> =
        lines.iter().map(|l| format!("{}|{}|{}", l["question_id"], l["polarity"], l["prompt"])).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 12, "no duplicated traces");
    assert!(lines.iter().all(|l| l["generator"] == "http:smollm2" && !l["text"].as_str().unwrap().is_empty()));
}

/// On-policy samples with `--samples-per-request`: llama.cpp's server
/// ignores OpenAI's `n` and answers with one choice, so the other samples go
/// one per request, each with its own seed, and all are kept.
#[test]
fn samples_asked_with_n_of_a_server_without_it_all_arrive() {
    let (_server, port) = start_server();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("traces.jsonl");
    let o = traces_cmd(port, &out, 2)
        .args(["--on-policy", "3", "--samples-per-request", "3", "--temperature", "0.9"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("6 requests, 0 from the cache") && err.contains("0 failed"), "{err}");
    assert_eq!(CallCache::open(&dir.path().join("llm_cache.sqlite")).unwrap().len(), 6);
}
