//! The HTTP backend against small servers on 127.0.0.1 that misbehave on
//! purpose: errors are retried, garbage is retried, failures are recorded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tabletrace_trace::{HttpLlm, HttpOptions, Llm, LlmParams};

/// Serves `script[i]` as the i-th answer (status, body), then the last one
/// forever; `{auth}` in a body is replaced by the request's Authorization
/// header (servers that echo it exist).
fn server(script: Vec<(u16, String)>) -> (String, Arc<AtomicUsize>) {
    let (addr, hits, _) = recording_server(script);
    (addr, hits)
}

/// [`server`], also keeping each request's body.
fn recording_server(script: Vec<(u16, String)>) -> (String, Arc<AtomicUsize>, Arc<Mutex<Vec<serde_json::Value>>>) {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let kept = bodies.clone();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(64) {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut len = 0usize;
            let mut auth = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if line.to_ascii_lowercase().starts_with("authorization:") {
                    auth = line["authorization:".len()..].trim().to_string();
                }
            }
            let mut body = vec![0u8; len];
            let _ = reader.read_exact(&mut body);
            kept.lock().unwrap().push(serde_json::from_slice(&body).unwrap_or_default());
            let i = counter.fetch_add(1, Ordering::SeqCst);
            let (status, text) = script[i.min(script.len() - 1)].clone();
            let text = text.replace("{auth}", &auth);
            let resp = format!("HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}", text.len());
            let _ = stream.write_all(resp.as_bytes());
        }
    });
    (addr, hits, bodies)
}

fn ok(text: &str) -> (u16, String) {
    (200, serde_json::json!({"choices": [{"message": {"role": "assistant", "content": text}}]}).to_string())
}

fn params() -> Vec<LlmParams> {
    vec![LlmParams { temperature: 0.0, top_p: 1.0, max_tokens: 8, seed: 1 }]
}

fn opts() -> HttpOptions {
    HttpOptions {
        concurrency: 2,
        timeout: Duration::from_secs(5),
        retries: 3,
        backoff: Duration::from_millis(10),
        api_key_env: None,
        samples_per_request: 1,
    }
}

/// An answer with these choices.
fn choices(texts: &[&str]) -> (u16, String) {
    let list: Vec<_> =
        texts.iter().map(|t| serde_json::json!({"message": {"role": "assistant", "content": t}})).collect();
    (200, serde_json::json!({ "choices": list }).to_string())
}

/// Four samples of one prompt (seeds 1–4), then another prompt.
fn samples() -> (Vec<String>, Vec<LlmParams>) {
    let p = |seed| LlmParams { temperature: 0.7, top_p: 0.95, max_tokens: 8, seed };
    (["q", "q", "q", "q", "r"].map(String::from).to_vec(), vec![p(1), p(2), p(3), p(4), p(5)])
}

#[test]
fn samples_of_one_prompt_go_as_one_request_with_n() {
    let (addr, hits, bodies) = recording_server(vec![choices(&["s1", "s2", "s3", "s4"]), choices(&["other"])]);
    let llm = HttpLlm::new(vec![addr], "m".into(), HttpOptions { concurrency: 1, samples_per_request: 8, ..opts() });
    let (prompts, params) = samples();
    let seen = Mutex::new(Vec::new());
    let out = llm.complete(&prompts, &params, &|i, _| seen.lock().unwrap().push(i));
    let texts: Vec<&str> = out.iter().map(|r| r.as_deref().unwrap()).collect();
    assert_eq!(texts, ["s1", "s2", "s3", "s4", "other"]);
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    let bodies = bodies.lock().unwrap();
    assert_eq!((bodies[0]["n"].as_u64(), bodies[0]["seed"].as_u64()), (Some(4), Some(1)), "{}", bodies[0]);
    assert_eq!(bodies[1]["n"], 1);
    assert_eq!(seen.lock().unwrap().len(), 5, "every sample is reported as it arrives");
}

#[test]
fn a_server_that_ignores_n_gets_the_other_samples_one_by_one() {
    // llama.cpp's server answers any n with one choice.
    let (addr, hits, bodies) =
        recording_server(vec![choices(&["s1"]), choices(&["s2"]), choices(&["s3"]), choices(&["s4"]), choices(&["r"])]);
    let llm = HttpLlm::new(vec![addr], "m".into(), HttpOptions { concurrency: 1, samples_per_request: 8, ..opts() });
    let (prompts, params) = samples();
    let out = llm.complete(&prompts, &params, &|_, _| {});
    let texts: Vec<&str> = out.iter().map(|r| r.as_deref().unwrap()).collect();
    assert_eq!(texts, ["s1", "s2", "s3", "s4", "r"]);
    assert_eq!(hits.load(Ordering::SeqCst), 5);
    let asked = || -> Vec<(u64, u64)> {
        let bodies = bodies.lock().unwrap();
        bodies.iter().map(|b| (b["n"].as_u64().unwrap(), b["seed"].as_u64().unwrap())).collect()
    };
    assert_eq!(asked(), [(4, 1), (1, 2), (1, 3), (1, 4), (1, 5)], "the rest with their own seeds");
    // Later samples of this backend go one per request.
    let out = llm.complete(&prompts[..2], &params[..2], &|_, _| {});
    assert!(out.iter().all(|r| r.is_ok()));
    assert_eq!(asked()[5..], [(1, 1), (1, 2)]);
}

#[test]
fn server_errors_and_garbage_are_retried() {
    let (addr, hits) =
        server(vec![(500, "{}".into()), (429, "{}".into()), (200, "not json".into()), ok("Final answer: 4")]);
    let llm = HttpLlm::new(vec![addr], "m".into(), opts());
    let out = llm.complete(&["2+2?".into()], &params(), &|_, _| {});
    assert_eq!(out[0].as_deref(), Ok("Final answer: 4"));
    assert_eq!(hits.load(Ordering::SeqCst), 4);
}

#[test]
fn client_errors_fail_at_once_and_persistent_failures_are_recorded() {
    let (addr, hits) = server(vec![(400, "{\"error\": \"bad model\"}".into())]);
    let llm = HttpLlm::new(vec![addr], "m".into(), opts());
    let out = llm.complete(&["x".into()], &params(), &|_, _| {});
    let e = out[0].as_ref().unwrap_err();
    assert!(e.contains("HTTP 400") && e.contains("bad model"), "{e}");
    assert_eq!(hits.load(Ordering::SeqCst), 1, "a 400 is not retried");

    let (addr, hits) = server(vec![(503, "{}".into())]);
    let llm = HttpLlm::new(vec![addr], "m".into(), opts());
    let e = llm.complete(&["x".into()], &params(), &|_, _| {}).remove(0).unwrap_err();
    assert!(e.contains("failed after 4 attempts") && e.contains("HTTP 503"), "{e}");
    assert_eq!(hits.load(Ordering::SeqCst), 4);
}

#[test]
fn a_server_that_is_down_is_a_recorded_failure() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port(); // bound, then closed
    let llm = HttpLlm::new(vec![format!("http://127.0.0.1:{port}")], "m".into(), HttpOptions { retries: 1, ..opts() });
    let e = llm.complete(&["x".into()], &params(), &|_, _| {}).remove(0).unwrap_err();
    assert!(e.contains("failed after 2 attempts"), "{e}");
}

#[test]
fn requests_spread_over_endpoints() {
    let (a, hits_a) = server(vec![ok("a")]);
    let (b, hits_b) = server(vec![ok("b")]);
    let llm = HttpLlm::new(vec![a, b], "m".into(), opts());
    let prompts: Vec<String> = (0..6).map(|i| format!("p{i}")).collect();
    let out = llm.complete(&prompts, &vec![params()[0].clone(); 6], &|_, _| {});
    assert!(out.iter().all(|r| r.is_ok()));
    assert_eq!(hits_a.load(Ordering::SeqCst), 3);
    assert_eq!(hits_b.load(Ordering::SeqCst), 3);
}

#[test]
fn a_refused_key_is_not_retried_and_never_stored() {
    // A 401 whose body echoes the request's Authorization header.
    let (addr, hits) = server(vec![(401, "{\"error\": \"invalid credentials: {auth}\"}".into())]);
    let var = "TABLETRACE_TEST_KEY_401";
    std::env::set_var(var, "sk-secret-0123456789");
    let llm = HttpLlm::new(vec![addr], "m".into(), HttpOptions { api_key_env: Some(var.into()), ..opts() });
    let e = llm.complete(&["x".into()], &params(), &|_, _| {}).remove(0).unwrap_err();
    assert_eq!(hits.load(Ordering::SeqCst), 1, "a 401 is not retried");
    assert!(!e.contains("sk-secret"), "the key leaked: {e}");
    assert!(e.contains("Bearer [redacted]") && e.contains("HTTP 401") && e.contains(var), "{e}");
    assert!(!e.contains("attempts"), "one request, not 'after N attempts': {e}");
}
