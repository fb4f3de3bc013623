//! Unit-test hooks natively, without Wasm: [`TestHost`] hands a hook its context, answers
//! its HTTP requests and records what it logs.
//!
//! ```
//! use shoal_hooks::testing::TestHost;
//! use shoal_hooks::http::Response;
//! use shoal_hooks::{Context, Event, Result};
//!
//! fn run(_: &Context) -> Result<String> {
//!     let r = shoal_hooks::http::get("http://127.0.0.1:8080/health").send()?;
//!     shoal_hooks::info!("health: {}", r.status);
//!     Ok("up".into())
//! }
//!
//! let host = TestHost::new().on_http("http://127.0.0.1:8080/health", |_| {
//!     Ok(Response { status: 200, headers: vec![], body: b"ok".to_vec() })
//! });
//! let run = host.run(&Context::new(Event::ValidateService), run);
//! assert_eq!(run.result.unwrap(), "up");
//! assert_eq!(run.logs[0].1, "health: 200");
//! ```

use std::cell::RefCell;
use std::rc::Rc;

use crate::http::{HttpError, Request, Response};
use crate::{Context, Level, Result};

type Responder = Rc<dyn Fn(&Request) -> std::result::Result<Response, HttpError>>;

/// A stand-in for the agent, for native unit tests of hook logic.
#[derive(Default)]
pub struct TestHost {
    responders: Vec<(String, Responder)>,
}

/// What one hook run under a [`TestHost`] did.
#[derive(Debug)]
pub struct TestRun {
    /// What the hook returned, as the agent would see it.
    pub result: Result<String>,
    /// Every line it logged, in order.
    pub logs: Vec<(Level, String)>,
    /// Every HTTP request it sent, in order.
    pub requests: Vec<Request>,
}

#[derive(Default)]
struct Recorder {
    responders: Vec<(String, Responder)>,
    logs: Vec<(Level, String)>,
    requests: Vec<Request>,
}

thread_local! {
    static CURRENT: RefCell<Option<Recorder>> = const { RefCell::new(None) };
}

impl TestHost {
    pub fn new() -> Self {
        TestHost::default()
    }

    /// Answers requests whose URL starts with `url_prefix`; the first matching responder
    /// wins. Requests that match none are denied, as the agent denies unlisted addresses.
    pub fn on_http(
        mut self,
        url_prefix: &str,
        respond: impl Fn(&Request) -> std::result::Result<Response, HttpError> + 'static,
    ) -> Self {
        self.responders
            .push((url_prefix.to_string(), Rc::new(respond)));
        self
    }

    /// Runs `hook` with `ctx`, as the agent would.
    pub fn run<M: Into<String>>(
        &self,
        ctx: &Context,
        hook: impl FnOnce(&Context) -> Result<M>,
    ) -> TestRun {
        let recorder = Recorder {
            responders: self.responders.clone(),
            ..Recorder::default()
        };
        CURRENT.with(|c| *c.borrow_mut() = Some(recorder));
        let result = hook(ctx).map(Into::into);
        let recorder = CURRENT.with(|c| c.borrow_mut().take()).unwrap_or_default();
        TestRun {
            result,
            logs: recorder.logs,
            requests: recorder.requests,
        }
    }
}

pub(crate) fn record_log(level: Level, message: &str) {
    let recorded = CURRENT.with(|c| match c.borrow_mut().as_mut() {
        Some(r) => {
            r.logs.push((level, message.to_string()));
            true
        }
        None => false,
    });
    if !recorded {
        eprintln!("[{level:?}] {message}");
    }
}

pub(crate) fn answer_http(req: Request) -> std::result::Result<Response, HttpError> {
    let responder = CURRENT.with(|c| {
        let mut c = c.borrow_mut();
        let r = c.as_mut()?;
        r.requests.push(req.clone());
        r.responders
            .iter()
            .find(|(prefix, _)| req.url.starts_with(prefix.as_str()))
            .map(|(_, f)| f.clone())
    });
    match responder {
        Some(respond) => respond(&req),
        None => Err(HttpError::Denied(format!(
            "{} is not on the test host's allow-list",
            req.url
        ))),
    }
}
