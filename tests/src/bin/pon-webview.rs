//! Drives one headless Chromium page for the end-to-end tests, inside a
//! lab host (so the browser reaches the lab's addresses): it opens the URL
//! given as its argument and keeps that one page open while it obeys
//! commands on stdin, one a line, answering each on stdout:
//!
//! - `wait SECONDS JS`: evaluates the JavaScript expression until it is
//!   truthy; `ok MS` (time taken) or `timeout LAST-VALUE`;
//! - `eval JS`: the expression's value, as JSON;
//! - `shot PATH`: a PNG screenshot of the page to PATH; `ok BYTES`.
//!
//! The page is never reloaded between commands, so a test sees what the
//! page's own script made of the server's pushes.

use anyhow::{bail, Context};
use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
use headless_chrome::{Browser, LaunchOptions};
use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let url = std::env::args().nth(1).context("usage: pon-webview URL")?;
    let profile = std::env::temp_dir().join(format!("pon-webview-{}", std::process::id()));
    let args = ["--disable-dev-shm-usage", "--hide-scrollbars"].map(std::ffi::OsStr::new);
    let options = LaunchOptions::default_builder()
        .path(Some("/usr/bin/chromium".into()))
        .headless(true)
        .sandbox(false)
        .window_size(Some((1400, 900)))
        .user_data_dir(Some(profile.clone()))
        .idle_browser_timeout(Duration::from_secs(600))
        .args(args.to_vec())
        .build()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let browser = Browser::new(options).context("starting chromium")?;
    let tab = browser.new_tab()?;
    tab.navigate_to(&url)?.wait_until_navigated()?;
    let eval = |js: &str| -> anyhow::Result<serde_json::Value> {
        let r = tab.evaluate(js, false)?;
        Ok(r.value.unwrap_or(serde_json::Value::Null))
    };
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let (cmd, rest) = line.split_once(' ').unwrap_or((&line, ""));
        let answer = match cmd {
            "wait" => {
                let (secs, js) = rest.split_once(' ').context("wait SECONDS JS")?;
                let deadline = Instant::now() + Duration::from_secs_f64(secs.parse()?);
                let start = Instant::now();
                loop {
                    let v = eval(js).unwrap_or_default();
                    let truthy =
                        !matches!(&v, serde_json::Value::Null | serde_json::Value::Bool(false))
                            && v != serde_json::json!(0)
                            && v != serde_json::json!("");
                    if truthy {
                        break format!("ok {}", start.elapsed().as_millis());
                    }
                    if Instant::now() >= deadline {
                        break format!("timeout {v}");
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            "eval" => eval(rest)?.to_string(),
            "shot" => {
                let png =
                    tab.capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)?;
                std::fs::write(rest, &png).with_context(|| format!("writing {rest}"))?;
                format!("ok {}", png.len())
            }
            "" => continue,
            other => bail!("unknown command {other:?}"),
        };
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    drop(tab);
    drop(browser);
    let _ = std::fs::remove_dir_all(profile);
    Ok(())
}
