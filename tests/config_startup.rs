//! Invalid configuration stops the server at start with a message naming the setting.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

fn serve_output(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(common::binary());
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

#[test]
fn invalid_environment_values_name_the_setting() {
    let (code, stderr) = serve_output(&[], &[("STATSREMOTE__STORAGE__DURABILITY", "eventually")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("durability"), "{stderr}");
    let (code, stderr) = serve_output(&[], &[("STATSREMOTE__LIMITS__MAX_EVENT_BYTES", "1B")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("limits.max_event_bytes"), "{stderr}");
    let (code, stderr) = serve_output(&[], &[("STATSREMOTE__SERVER__COLOUR", "red")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("colour"), "{stderr}");
}

#[test]
fn invalid_config_file_names_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[actors]\nmailbox_capacity = \"many\"\n").unwrap();
    let (code, stderr) = serve_output(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("mailbox_capacity"), "{stderr}");
    let missing = dir.path().join("missing.toml");
    let (code, stderr) = serve_output(&["--config", missing.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("missing.toml"), "{stderr}");
}

#[test]
fn a_config_file_and_the_environment_apply() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("good.toml");
    std::fs::write(
        &file,
        "[log]\nformat = \"json\"\n[tenant_defaults]\nrate_limit_burst = 123\n",
    )
    .unwrap();
    let server =
        common::TestServer::start_with_env(&[("STATSREMOTE__TENANT_DEFAULTS__DEDUP_WINDOW", "2h")]);
    // The file is passed through the environment-independent flag in a second server below;
    // here the environment alone changes a default.
    let created = server.admin(
        "POST",
        "/admin/v1/tenants",
        Some(&serde_json::json!({"name": "x"})),
    );
    assert_eq!(created.json()["settings"]["dedup_window"], "2h");
    drop(server);

    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(common::binary())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--config",
            file.to_str().unwrap(),
            "--data-dir",
        ])
        .arg(data.path())
        .env("STATSREMOTE_ADMIN_TOKEN", common::ADMIN_TOKEN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    let base = line
        .trim()
        .strip_prefix("statsremote listening on ")
        .unwrap()
        .to_string();
    let reply = ureq::post(&format!("{base}/admin/v1/tenants"))
        .set("Authorization", &format!("Bearer {}", common::ADMIN_TOKEN))
        .send_json(serde_json::json!({"name": "y"}))
        .unwrap();
    let body: serde_json::Value = reply.into_json().unwrap();
    assert_eq!(body["settings"]["rate_limit_burst"], 123);
    common::send_signal(child.id(), "TERM");
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    // Logs are JSON lines when log.format = "json".
    let stderr = String::from_utf8_lossy(&output.stderr);
    let first = stderr.lines().next().unwrap_or("");
    assert!(
        serde_json::from_str::<serde_json::Value>(first).is_ok(),
        "not JSON: {first}"
    );
}

/// Runs the server under `prlimit` with the given open-file limits (soft:hard) until it says
/// where it listens; returns the process (to kill) and its soft limit then.
fn start_with_nofile(limits: &str) -> Result<(std::process::Child, u64), String> {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new("prlimit")
        .arg(format!("--nofile={limits}"))
        .arg(common::binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("STATSREMOTE_ADMIN_TOKEN", common::ADMIN_TOKEN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let started = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|line| line.starts_with("statsremote listening on"));
    if !started {
        let output = child.wait_with_output().unwrap();
        return Err(String::from_utf8_lossy(&output.stderr).to_string());
    }
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap();
    Ok((child, soft))
}

#[test]
fn the_open_file_limit_is_raised_and_shared_or_the_server_refuses_to_start() {
    let (mut child, soft) = start_with_nofile("512:4096").unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(soft, 4096, "the soft limit is raised to the hard one");
    let stderr = start_with_nofile("300:300").expect_err("refused to start");
    assert!(
        stderr.contains("open-file limit is 300") && stderr.contains("server.max_connections"),
        "{stderr}"
    );
}

#[test]
fn a_short_admin_token_is_refused_without_being_echoed() {
    let (code, stderr) = serve_output(&[], &[("STATSREMOTE_ADMIN_TOKEN", "hunter2")]);
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("at least 16 characters"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

/// The server turns transparent huge pages off for itself (docs/decisions/0040), unless
/// `MIMALLOC_ALLOW_THP` asks for them.
#[cfg(target_os = "linux")]
#[test]
fn the_server_runs_without_transparent_huge_pages() {
    fn thp_enabled(server: &common::TestServer) -> String {
        let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
        let line = status.lines().find(|line| line.starts_with("THP_enabled:"));
        line.expect("THP_enabled in /proc/PID/status (Linux 5.0 and later)")
            .trim_start_matches("THP_enabled:")
            .trim()
            .to_string()
    }
    if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
        return; // A kernel without transparent huge pages: nothing to turn off.
    }
    assert_eq!(
        thp_enabled(&common::TestServer::start_with_env(&[(
            "MIMALLOC_ALLOW_THP",
            "0"
        )])),
        "0"
    );
    assert_eq!(thp_enabled(&common::TestServer::start()), "0");
    let asked = common::TestServer::start_with_env(&[("MIMALLOC_ALLOW_THP", "1")]);
    assert_eq!(thp_enabled(&asked), "1");
}
