//! A ValidateService hook for an inference endpoint: it sends the revision's golden inputs
//! to the freshly started model server and checks each prediction against the expected
//! output. A model that answers, but answers wrong, fails the deployment and is rolled back.
//!
//! The golden file (`golden.json` in the revision, or parameter `golden`) looks like
//! `{"cases": [{"input": [1.0, 2.0], "expected": [0.5]}], "tolerance": 0.001}`. The endpoint
//! is `POST http://127.0.0.1:<port>/predict` with `{"input": [...]}`, answering
//! `{"output": [...]}`; the port comes from parameter `port` (default 8080).

use serde::Deserialize;
use shoal_hooks::{Context, Result, ResultExt, bail, http, info};

#[derive(Deserialize)]
struct Golden {
    cases: Vec<Case>,
    #[serde(default = "default_tolerance")]
    tolerance: f64,
}

#[derive(Deserialize)]
struct Case {
    input: Vec<f64>,
    expected: Vec<f64>,
}

#[derive(Deserialize)]
struct Prediction {
    output: Vec<f64>,
}

fn default_tolerance() -> f64 {
    1e-6
}

pub fn run(ctx: &Context) -> Result<String> {
    let root = ctx.param("revision_dir").unwrap_or("/revision");
    let golden_path = format!("{root}/{}", ctx.param("golden").unwrap_or("golden.json"));
    let text = std::fs::read_to_string(&golden_path).context(format!("reading {golden_path}"))?;
    let golden: Golden = serde_json::from_str(&text).context(format!("parsing {golden_path}"))?;
    if golden.cases.is_empty() {
        bail!("{golden_path} lists no cases");
    }
    let port = ctx.param("port").unwrap_or("8080");
    let url = format!("http://127.0.0.1:{port}/predict");

    for (n, case) in golden.cases.iter().enumerate() {
        let body = serde_json::json!({ "input": case.input }).to_string();
        let answer = http::post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .context(format!("case {n}: POST {url}"))?;
        if answer.status != 200 {
            bail!(
                "case {n}: {url} answered HTTP {}: {}",
                answer.status,
                answer.text().unwrap_or("(binary)")
            );
        }
        let prediction: Prediction = serde_json::from_slice(&answer.body)
            .context(format!("case {n}: reading the prediction"))?;
        let off = prediction.output.len() != case.expected.len()
            || prediction
                .output
                .iter()
                .zip(&case.expected)
                .any(|(a, b)| (a - b).abs() > golden.tolerance);
        if off {
            bail!(
                "case {n}: predicted {:?} for input {:?}, expected {:?} (tolerance {})",
                prediction.output,
                case.input,
                case.expected,
                golden.tolerance
            );
        }
        info!("case {n}: {:?} -> {:?} ok", case.input, prediction.output);
    }
    Ok(format!("{} golden prediction(s) match", golden.cases.len()))
}

shoal_hooks::hook!(run);

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_hooks::Event;
    use shoal_hooks::http::Response;
    use shoal_hooks::testing::TestHost;

    fn revision_with_golden() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("validate-inference-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("golden.json"),
            r#"{"cases":[{"input":[1.0,2.0],"expected":[5.0]}],"tolerance":0.01}"#,
        )
        .unwrap();
        dir
    }

    fn answering(output: &'static str) -> TestHost {
        TestHost::new().on_http("http://127.0.0.1:9000/predict", move |req| {
            assert_eq!(req.method, "POST");
            assert_eq!(req.body, br#"{"input":[1.0,2.0]}"#);
            Ok(Response {
                status: 200,
                headers: vec![],
                body: output.as_bytes().to_vec(),
            })
        })
    }

    #[test]
    fn right_prediction_passes_and_wrong_one_fails() {
        let dir = revision_with_golden();
        let ctx = Context::new(Event::ValidateService)
            .with_param("revision_dir", dir.to_str().unwrap())
            .with_param("port", "9000");

        let good = answering(r#"{"output":[5.001]}"#).run(&ctx, run);
        assert_eq!(good.result.unwrap(), "1 golden prediction(s) match");
        assert_eq!(good.requests.len(), 1);

        let bad = answering(r#"{"output":[7.0]}"#).run(&ctx, run);
        let reason = bad.result.unwrap_err().to_string();
        assert!(reason.contains("predicted [7.0]"), "{reason}");

        let down = TestHost::new().run(&ctx, run);
        assert!(down.result.unwrap_err().to_string().contains("denied"));
    }
}
