//! Which generator makes traces: the `--generator` / `traces.generators`
//! values `program`, `local:MODEL` and `http:URL[,URL…]#MODEL`, parsed once.

use std::fmt;

use crate::error::{Error, Result};

/// A trace generator, as named on the command line and in configs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GeneratorSpec {
    /// The program tracer (gold SQL executed step by step).
    Program,
    /// The embedded model: a short name, `.gguf` file, folder or hub id.
    Local {
        /// The model.
        model: String,
    },
    /// An OpenAI-compatible server (requests spread over the endpoints).
    Http {
        /// Base URLs (`http://host:port` or `…/v1`), without a trailing `/`.
        endpoints: Vec<String>,
        /// The served model's name.
        model: String,
    },
}

const FORMS: &str = "program, local:MODEL or http:URL[,URL…]#MODEL";

impl GeneratorSpec {
    /// Parses `program`, `local:MODEL` or `http:URL[,URL…]#MODEL`.
    pub fn parse(spec: &str) -> Result<GeneratorSpec> {
        let err = |message: String| Error::Spec { spec: spec.to_string(), message };
        if spec == "program" {
            return Ok(GeneratorSpec::Program);
        }
        if let Some(model) = spec.strip_prefix("local:") {
            if model.is_empty() {
                return Err(err("expected local:MODEL".into()));
            }
            return Ok(GeneratorSpec::Local { model: model.to_string() });
        }
        let Some(rest) = spec.strip_prefix("http:") else {
            return Err(err(format!("expected {FORMS}")));
        };
        let (urls, model) = rest
            .rsplit_once('#')
            .ok_or_else(|| err("expected http:URL#MODEL (several URLs separated by commas)".into()))?;
        let endpoints: Vec<String> =
            urls.split(',').map(|u| u.trim().trim_end_matches('/').to_string()).filter(|u| !u.is_empty()).collect();
        if endpoints.is_empty() || model.is_empty() {
            return Err(err("expected http:URL#MODEL".into()));
        }
        if let Some(e) = endpoints.iter().find(|e| !(e.starts_with("http://") || e.starts_with("https://"))) {
            return Err(err(format!("endpoint {e:?} must start with http:// or https://")));
        }
        Ok(GeneratorSpec::Http { endpoints, model: model.to_string() })
    }

    /// Whether it is an LLM (local or HTTP), which takes the LLM settings.
    pub fn is_llm(&self) -> bool {
        !matches!(self, GeneratorSpec::Program)
    }
}

impl fmt::Display for GeneratorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GeneratorSpec::Program => f.write_str("program"),
            GeneratorSpec::Local { model } => write!(f, "local:{model}"),
            GeneratorSpec::Http { endpoints, model } => write!(f, "http:{}#{model}", endpoints.join(",")),
        }
    }
}

impl std::str::FromStr for GeneratorSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        GeneratorSpec::parse(s)
    }
}

/// Written as its string form (`local:MODEL`), as configs hold it.
impl serde::Serialize for GeneratorSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for GeneratorSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        GeneratorSpec::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_forms_parse_and_print_back() {
        assert_eq!(GeneratorSpec::parse("program").unwrap(), GeneratorSpec::Program);
        assert_eq!(
            GeneratorSpec::parse("local:qwen2.5-coder-0.5b").unwrap(),
            GeneratorSpec::Local { model: "qwen2.5-coder-0.5b".into() }
        );
        let h = GeneratorSpec::parse("http:http://127.0.0.1:8080,http://127.0.0.1:8081/#qwen").unwrap();
        assert_eq!(
            h,
            GeneratorSpec::Http {
                endpoints: vec!["http://127.0.0.1:8080".into(), "http://127.0.0.1:8081".into()],
                model: "qwen".into()
            }
        );
        assert_eq!(h.to_string(), "http:http://127.0.0.1:8080,http://127.0.0.1:8081#qwen");
        assert!(h.is_llm() && !GeneratorSpec::Program.is_llm());
        let json = serde_json::to_string(&vec![GeneratorSpec::Program, h.clone()]).unwrap();
        assert_eq!(json, r#"["program","http:http://127.0.0.1:8080,http://127.0.0.1:8081#qwen"]"#);
        assert_eq!(serde_json::from_str::<Vec<GeneratorSpec>>(&json).unwrap()[1], h);
        assert!(serde_json::from_str::<GeneratorSpec>(r#""lokal:x""#).unwrap_err().to_string().contains("expected"));
    }

    #[test]
    fn malformed_specs_say_what_is_expected() {
        let msg = |s: &str| GeneratorSpec::parse(s).unwrap_err().to_string();
        assert!(msg("http:http://x").contains("URL#MODEL"));
        assert!(msg("http:ftp://x#m").contains("must start with http"));
        assert!(msg("llama").contains("program, local:MODEL or http:"));
        assert!(msg("local:").contains("local:MODEL"));
    }
}
