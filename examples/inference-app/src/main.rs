//! The example inference app: loads a small multi-layer perceptron from a JSON file and
//! serves `POST /predict` (`{"input": [..]}` -> `{"output": [..], "model": ".."}`) and
//! `GET /health` on 127.0.0.1. It is the application the example revisions deploy and the
//! `validate-inference` hook checks. It stays dependency-free (std and serde_json) so the
//! examples build in seconds; a real server would use a real HTTP stack.
//!
//! Usage: `inference-app --model PATH [--port PORT]` (the port also from `$PORT`, default 8080).

mod model;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use model::Model;

fn main() {
    let mut model_path = None;
    let mut port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8080);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--model" => model_path = args.next(),
            "--port" => {
                port = args
                    .next()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| die("--port needs a number"))
            }
            other => die(&format!(
                "unknown argument `{other}`; usage: inference-app --model PATH [--port PORT]"
            )),
        }
    }
    let model_path = model_path.unwrap_or_else(|| die("--model PATH is required"));
    let model =
        Model::load(&model_path).unwrap_or_else(|e| die(&format!("loading {model_path}: {e}")));
    let listener = TcpListener::bind(("127.0.0.1", port))
        .unwrap_or_else(|e| die(&format!("binding 127.0.0.1:{port}: {e}")));
    eprintln!(
        "inference-app: serving model `{}` ({} inputs) on 127.0.0.1:{port}",
        model.name,
        model.inputs()
    );
    let model = Arc::new(model);
    for stream in listener.incoming().flatten() {
        let model = model.clone();
        std::thread::spawn(move || {
            let _ = serve(stream, &model);
        });
    }
}

fn die(message: &str) -> ! {
    eprintln!("inference-app: {message}");
    std::process::exit(2);
}

/// Answers one request per connection.
fn serve(stream: TcpStream, model: &Model) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    if length > 1 << 20 {
        return respond(stream, 413, r#"{"error":"request too large"}"#);
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    let mut parts = request_line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some("/health")) => respond(
            stream,
            200,
            &format!(r#"{{"status":"ok","model":"{}"}}"#, model.name),
        ),
        (Some("POST"), Some("/predict")) => match predict(model, &body) {
            Ok(answer) => respond(stream, 200, &answer),
            Err(e) => respond(stream, 400, &serde_json::json!({ "error": e }).to_string()),
        },
        _ => respond(stream, 404, r#"{"error":"not found"}"#),
    }
}

fn predict(model: &Model, body: &[u8]) -> Result<String, String> {
    #[derive(serde::Deserialize)]
    struct Input {
        input: Vec<f64>,
    }
    let input: Input =
        serde_json::from_slice(body).map_err(|e| format!("bad request body: {e}"))?;
    let output = model.predict(&input.input)?;
    Ok(serde_json::json!({ "output": output, "model": model.name }).to_string())
}

fn respond(mut stream: TcpStream, status: u16, body: &str) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Error",
    };
    write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}
