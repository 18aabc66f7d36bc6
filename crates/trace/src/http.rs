//! OpenAI-compatible chat-completions backends (vLLM, SGLang, llama.cpp's
//! server, Ollama, hosted APIs): several endpoints with load spreading,
//! bounded concurrency, per-request time-outs, and retries with exponential
//! backoff and jitter on 429, 5xx, time-outs and unreadable answers. The API
//! key is read from an environment variable and never written anywhere: a
//! server text kept in an error (which traces store) has the key and anything
//! shaped like an `Authorization` header redacted. A 401 or 403 is not
//! retried and says which variable holds the key.
//!
//! Several samples of one prompt (on-policy sampling) can go as one request
//! with OpenAI's `n` ([`HttpOptions::samples_per_request`]), as vLLM and
//! SGLang serve them: one prefill for all. A server that answers with fewer
//! choices than asked (llama.cpp's server ignores `n`) gets the rest as
//! separate requests, each with its own seed, and no further `n` requests.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::llm::{Done, Llm, LlmParams};

/// Settings of an HTTP backend.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Requests in flight at most (over all endpoints). Default 8.
    pub concurrency: usize,
    /// Time-out of one request. Default 120 s.
    pub timeout: Duration,
    /// Retries after the first attempt. Default 4.
    pub retries: u32,
    /// First backoff; doubles each retry, plus up to 50% jitter. Default 0.5 s.
    pub backoff: Duration,
    /// Environment variable holding the API key, if any. Default `OPENAI_API_KEY`.
    pub api_key_env: Option<String>,
    /// Consecutive prompts that are the same, with the same settings but
    /// their seeds (samples of one prompt), go as one request with OpenAI's
    /// `n` (up to this many), seeded with the first one's seed. Default 1:
    /// one completion per request.
    pub samples_per_request: usize,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            concurrency: 8,
            timeout: Duration::from_secs(120),
            retries: 4,
            backoff: Duration::from_millis(500),
            api_key_env: Some("OPENAI_API_KEY".into()),
            samples_per_request: 1,
        }
    }
}

/// A model served over the OpenAI chat-completions API by one or more endpoints.
pub struct HttpLlm {
    endpoints: Vec<String>,
    model: String,
    opts: HttpOptions,
    agent: ureq::Agent,
    next_endpoint: AtomicUsize,
    /// Set when a server answered an `n` request with fewer choices.
    n_unsupported: AtomicBool,
}

impl std::fmt::Debug for HttpLlm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpLlm").field("endpoints", &self.endpoints).field("model", &self.model).finish()
    }
}

impl HttpLlm {
    /// A backend for `model` on these base URLs (`http://host:port` or `…/v1`).
    pub fn new(endpoints: Vec<String>, model: String, opts: HttpOptions) -> HttpLlm {
        let agent = ureq::AgentBuilder::new().timeout(opts.timeout).build();
        HttpLlm {
            endpoints,
            model,
            opts,
            agent,
            next_endpoint: AtomicUsize::new(0),
            n_unsupported: AtomicBool::new(false),
        }
    }

    fn url(base: &str) -> String {
        if base.ends_with("/v1") {
            format!("{base}/chat/completions")
        } else {
            format!("{base}/v1/chat/completions")
        }
    }

    /// `n` completions of one prompt in one request, with retries: all
    /// `choices` the server returned (it may return fewer than `n`).
    fn request(&self, prompt: &str, p: &LlmParams, n: usize, jitter: &Mutex<u64>) -> Result<Vec<String>, String> {
        let body = serde_json::json!({
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": p.temperature,
            "top_p": p.top_p,
            "max_tokens": p.max_tokens,
            "seed": p.seed,
            "n": n,
        });
        self.post(&body, jitter, |v| {
            let choices = v.get("choices")?.as_array()?;
            let texts: Option<Vec<String>> =
                choices.iter().map(|c| c.pointer("/message/content")?.as_str().map(str::to_string)).collect();
            texts.filter(|t| !t.is_empty())
        })
    }

    /// Posts `body` with retries until `read` finds its answer in the reply;
    /// the error names the endpoint and the last failure, with the API key
    /// and authorization headers redacted.
    fn post<T>(
        &self,
        body: &serde_json::Value,
        jitter: &Mutex<u64>,
        read: impl Fn(&serde_json::Value) -> Option<T>,
    ) -> Result<T, String> {
        let key_env = self.opts.api_key_env.as_deref();
        let key = key_env.and_then(|v| std::env::var(v).ok()).filter(|k| !k.is_empty());
        let mut last = String::new();
        let mut attempts = 0;
        for attempt in 0..=self.opts.retries {
            attempts += 1;
            let base = &self.endpoints[self.next_endpoint.fetch_add(1, Ordering::Relaxed) % self.endpoints.len()];
            let mut req = self.agent.post(&Self::url(base)).set("Content-Type", "application/json");
            if let Some(k) = &key {
                req = req.set("Authorization", &format!("Bearer {k}"));
            }
            let retry = match req.send_json(body) {
                Ok(resp) => match resp.into_json::<serde_json::Value>() {
                    Ok(v) => match read(&v) {
                        Some(answer) => return Ok(answer),
                        None => {
                            last = format!("{base}: the answer has no choices[0].message.content");
                            true
                        }
                    },
                    Err(e) => {
                        last = format!("{base}: unreadable answer: {e}");
                        true
                    }
                },
                Err(ureq::Error::Status(code, resp)) => {
                    let detail: String = resp.into_string().unwrap_or_default().chars().take(200).collect();
                    let detail = redact(&detail, key.as_deref());
                    last = if code == 401 || code == 403 {
                        let hint = match (key_env, &key) {
                            (Some(v), Some(_)) => format!("check the API key in ${v}"),
                            (Some(v), None) => format!("${v} is not set: set it to the server's API key"),
                            (None, _) => "no API key is sent (no key variable is configured)".to_string(),
                        };
                        format!("{base}: HTTP {code}, the server refused the request ({hint}): {detail}")
                    } else {
                        format!("{base}: HTTP {code}: {detail}")
                    };
                    code == 429 || code >= 500
                }
                Err(ureq::Error::Transport(t)) => {
                    last = format!("{base}: {}", redact(&t.to_string(), key.as_deref()));
                    true
                }
            };
            if !retry || attempt == self.opts.retries {
                break;
            }
            let wait = self.opts.backoff * 2u32.pow(attempt);
            let mut j = jitter.lock().expect("jitter lock");
            *j = j.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let extra = wait.mul_f64(((*j >> 33) % 1000) as f64 / 2000.0);
            drop(j);
            std::thread::sleep(wait + extra);
        }
        Err(if attempts == 1 { last } else { format!("failed after {attempts} attempts: {last}") })
    }
}

/// `text` with the API key, `Bearer` tokens and the values of
/// `Authorization` / `api-key` headers replaced by `[redacted]` (servers echo
/// requests in their errors). A value runs to the next quote, comma, brace,
/// backslash or line end.
pub fn redact(text: &str, key: Option<&str>) -> String {
    let mut out = match key {
        Some(k) if k.len() >= 4 => text.replace(k, "[redacted]"),
        _ => text.to_string(),
    };
    for marker in ["authorization", "api-key", "bearer "] {
        let mut from = 0;
        while let Some(at) = out[from..].to_ascii_lowercase().find(marker) {
            let start = from + at + marker.len();
            // Skip what separates a header's name from its value: `: `, `":"`, `\":\"`.
            let rest = &out[start..];
            let skipped = rest.len() - rest.trim_start_matches([' ', '"', '\\', ':', '=']).len();
            if marker != "bearer " && !rest[..skipped].contains([':', '=']) {
                from = start; // the word, not a header
                continue;
            }
            let value_start = start + skipped;
            let value_end =
                out[value_start..].find(['"', ',', '}', '\n', '\r', '\\']).map_or(out.len(), |e| value_start + e);
            let value = &out[value_start..value_end];
            let replacement =
                if value.to_ascii_lowercase().starts_with("bearer ") { "Bearer [redacted]" } else { "[redacted]" };
            if value.is_empty() || value == replacement {
                from = value_end.max(start);
                continue;
            }
            out.replace_range(value_start..value_end, replacement);
            from = value_start + replacement.len();
        }
    }
    out
}

impl Llm for HttpLlm {
    fn backend(&self) -> &str {
        "http"
    }

    fn model(&self) -> &str {
        &self.model
    }

    fn complete(&self, prompts: &[String], params: &[LlmParams], done: &Done<'_>) -> Vec<Result<String, String>> {
        let results: Vec<Mutex<Option<Result<String, String>>>> = prompts.iter().map(|_| Mutex::new(None)).collect();
        let groups = sample_groups(prompts, params, self.opts.samples_per_request);
        let next = AtomicUsize::new(0);
        let jitter = Mutex::new(0x2545_F491_4F6C_DD1D);
        let answer = |i: usize, r: Result<String, String>| {
            done(i, &r);
            *results[i].lock().expect("result lock") = Some(r);
        };
        std::thread::scope(|s| {
            for _ in 0..self.opts.concurrency.clamp(1, groups.len().max(1)) {
                s.spawn(|| loop {
                    let g = next.fetch_add(1, Ordering::Relaxed);
                    let Some(rows) = groups.get(g) else { break };
                    let mut from = rows.start;
                    if rows.len() > 1 && !self.n_unsupported.load(Ordering::Relaxed) {
                        match self.request(&prompts[from], &params[from], rows.len(), &jitter) {
                            Ok(texts) => {
                                if texts.len() < rows.len() && !self.n_unsupported.swap(true, Ordering::Relaxed) {
                                    tracing::warn!(
                                        "the server answered n = {} with {} choice(s): samples go one per request",
                                        rows.len(),
                                        texts.len()
                                    );
                                }
                                for text in texts.into_iter().take(rows.len()) {
                                    answer(from, Ok(text));
                                    from += 1;
                                }
                            }
                            Err(e) => {
                                rows.clone().for_each(|i| answer(i, Err(e.clone())));
                                from = rows.end;
                            }
                        }
                    }
                    for i in from..rows.end {
                        let r = self.request(&prompts[i], &params[i], 1, &jitter);
                        answer(i, r.map(|mut texts| texts.swap_remove(0)));
                    }
                });
            }
        });
        results.into_iter().map(|m| m.into_inner().expect("result lock").expect("every request ran")).collect()
    }
}

/// Consecutive rows that can share one `n` request: the same prompt and
/// settings but the seed, at most `max_n` together.
fn sample_groups(prompts: &[String], params: &[LlmParams], max_n: usize) -> Vec<std::ops::Range<usize>> {
    let mut groups = Vec::new();
    let mut i = 0;
    while i < prompts.len() {
        let mut j = i + 1;
        while j < prompts.len()
            && j - i < max_n.max(1)
            && prompts[j] == prompts[i]
            && params[j].same_but_seed(&params[i])
        {
            j += 1;
        }
        groups.push(i..j);
        i = j;
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_of_one_prompt_are_grouped_up_to_n() {
        let p = |seed: u64, temperature: f64| LlmParams { temperature, top_p: 0.95, max_tokens: 8, seed };
        let prompts: Vec<String> = ["a", "a", "a", "b", "a", "a"].map(String::from).to_vec();
        let params = vec![p(1, 0.7), p(2, 0.7), p(3, 0.7), p(4, 0.7), p(5, 0.7), p(6, 0.0)];
        assert_eq!(sample_groups(&prompts, &params, 2), vec![0..2, 2..3, 3..4, 4..5, 5..6]);
        assert_eq!(sample_groups(&prompts, &params, 8), vec![0..3, 3..4, 4..5, 5..6]);
        assert_eq!(sample_groups(&prompts, &params, 1).len(), 6);
    }

    #[test]
    fn chat_completion_urls() {
        assert_eq!(HttpLlm::url("http://h:1/v1"), "http://h:1/v1/chat/completions");
        assert_eq!(HttpLlm::url("http://h:1"), "http://h:1/v1/chat/completions");
    }

    #[test]
    fn keys_and_authorization_values_are_redacted() {
        let key = "sk-test-123456";
        let cases = [
            ("invalid key sk-test-123456", "invalid key [redacted]"),
            (
                "{\"error\": \"bad header Authorization: Bearer abc.def\"}",
                "{\"error\": \"bad header Authorization: Bearer [redacted]\"}",
            ),
            ("{\"authorization\": \"Bearer xyz\", \"a\": 1}", "{\"authorization\": \"Bearer [redacted]\", \"a\": 1}"),
            ("got bearer qwerty\nbye", "got bearer [redacted]\nbye"),
            ("api-key=abc, ok", "api-key=[redacted], ok"),
            ("no authorization given", "no authorization given"),
        ];
        for (text, want) in cases {
            assert_eq!(redact(text, Some(key)), want, "{text}");
        }
        assert!(!redact("echo: Bearer sk-test-123456", Some(key)).contains("sk-test"));
    }
}
