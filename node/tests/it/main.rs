//! The `roost` binary's own checks: argument parsing and the errors a user
//! sees before any node is involved. (Multi-node tests live in `roost-tests`;
//! this target also makes `cargo test` build the binary they run.)

use std::process::Command;

fn roost(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_roost"))
        .args(args)
        .env_remove("ROOST_ENDPOINT")
        .env_remove("ROOST_TOKEN")
        .output()
        .expect("run roost");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn version_prints_the_version() {
    let (code, stdout, _) = roost(&["version"]);
    assert_eq!(code, 0);
    assert!(stdout.starts_with("roost "), "{stdout}");
}

#[test]
fn a_client_command_without_endpoint_says_how_to_set_one() {
    let (code, _, stderr) = roost(&["apps", "list"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("ROOST_ENDPOINT"), "{stderr}");
}

#[test]
fn a_client_command_without_token_says_where_it_is() {
    let (code, _, stderr) = roost(&["apps", "list", "--endpoint", "127.0.0.1:9"]);
    assert_eq!(code, 4, "{stderr}");
    assert!(stderr.contains("admin.token"), "{stderr}");
}

#[test]
fn a_malformed_token_is_refused_before_connecting() {
    let (code, _, stderr) = roost(&["apps", "list", "--endpoint", "127.0.0.1:9", "--token", "SWMTKN-1-abc"]);
    assert_eq!(code, 4, "{stderr}");
    assert!(stderr.contains("ROOST-1-"), "{stderr}");
}

#[test]
fn a_bad_label_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("n1");
    let (code, _, stderr) = roost(&[
        "node",
        "init",
        "--data-dir",
        data.to_str().expect("utf-8"),
        "--listen",
        "127.0.0.1:0",
        "--label",
        "oops",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("KEY=VALUE"), "{stderr}");
    assert!(!data.exists(), "nothing may be written for a refused command");
}

#[test]
fn a_wildcard_listen_without_advertise_is_explained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("n1");
    let (code, _, stderr) =
        roost(&["node", "init", "--data-dir", data.to_str().expect("utf-8"), "--listen", "0.0.0.0:0", "--name", "n1"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("--advertise"), "{stderr}");
}
