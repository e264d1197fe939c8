//! roost.toml parsing and validation.

use proptest::prelude::proptest;

use super::*;

const FULL: &str = r#"
app = "hello"

[build]
dockerfile = "Dockerfile"
args = { VERSION = "1.2" }

[env]
LOG_LEVEL = "info"

[deploy]
strategy = "rolling"
max_unavailable = 0.33
release_command = "/app migrate"
initial_count = 2

[[vm]]
cpus = 0.5
memory = "512mb"

[http_service]
internal_port = 8080
force_https = true
[http_service.concurrency]
type = "requests"
soft_limit = 20
hard_limit = 25
[[http_service.checks]]
path = "/health"
interval = "5s"
timeout = "1s"

[checks.db]
type = "tcp"
port = 5432

[processes]
web = "/app serve"
worker = "/app work"

[[restart]]
policy = "on-failure"
max_retries = 3
processes = ["worker"]

[placement]
constraints = ["region == eu", "disk != hdd"]
max_per_node = 1
"#;

fn problems(text: &str) -> Vec<String> {
    AppConfig::parse(text).expect("parses").validate().into_iter().map(|p| p.to_string()).collect()
}

#[test]
fn a_full_config_parses_and_validates() {
    let config = AppConfig::parse(FULL).expect("parses");
    assert_eq!(config.validate(), []);
    assert_eq!(config.app, "hello");
    assert_eq!(config.deploy.strategy, Strategy::Rolling);
    assert_eq!(config.deploy.initial_count, Some(2));
    assert_eq!(config.vm[0].memory.bytes(), Ok(512 << 20));
    assert_eq!(config.process_groups(), ["web", "worker"]);
    assert_eq!(config.restart[0].policy, RestartPolicy::OnFailure);
    let http = config.http_service.expect("http_service");
    assert_eq!(http.checks[0].kind, CheckKind::Http);
    assert_eq!(config.checks["db"].kind, CheckKind::Tcp);
}

#[test]
fn the_smallest_config_is_just_a_name() {
    let config = AppConfig::parse(r#"app = "tiny""#).expect("parses");
    assert_eq!(config.validate(), []);
    assert_eq!(config.process_groups(), ["app"]);
    assert_eq!(config.deploy.strategy, Strategy::Rolling);
}

#[test]
fn an_unknown_key_is_named_with_its_line() {
    let error = AppConfig::parse("app = \"hello\"\n\n[http_service]\ninternal_port = 80\ninternal_prot = 81\n")
        .expect_err("typo");
    assert!(error.contains("internal_prot"), "{error}");
    assert!(error.contains("line 5"), "{error}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let found = problems(
        r#"
app = "Bad_Name"
[build]
dockerfile = "Dockerfile"
image = "x:1"
[[vm]]
cpus = 0
memory = "12tb"
[http_service]
internal_port = 0
[http_service.concurrency]
soft_limit = 30
hard_limit = 20
[[http_service.checks]]
path = "health"
interval = "1s"
timeout = "5s"
[[restart]]
policy = "always"
max_retries = 2
processes = ["nope"]
[placement]
constraints = ["region = eu"]
[deploy]
initial_count = 0
"#,
    );
    let expected_keys = [
        "app:",
        "build:",
        "restart[0].processes:",
        "vm[0].cpus:",
        "vm[0].memory:",
        "http_service.internal_port:",
        "http_service.concurrency:",
        "http_service.checks[0].path:",
        "http_service.checks[0].timeout:",
        "restart[0].max_retries:",
        "placement.constraints[0]:",
        "deploy.initial_count:",
    ];
    for key in expected_keys {
        assert!(found.iter().any(|p| p.starts_with(key)), "missing {key} in {found:#?}");
    }
    assert_eq!(found.len(), expected_keys.len(), "{found:#?}");
}

#[test]
fn a_check_without_a_port_needs_an_http_service() {
    let found = problems("app = \"a\"\n[checks.up]\npath = \"/\"\n");
    assert_eq!(found, ["checks.up.port: is required when there is no [http_service] to take it from"]);
}

#[test]
fn memory_reads_common_units() {
    assert_eq!(Memory::Megabytes(256).bytes(), Ok(256 << 20));
    assert_eq!(Memory::Text("1gb".into()).bytes(), Ok(1 << 30));
    assert_eq!(Memory::Text("512MB".into()).bytes(), Ok(512 << 20));
    assert!(Memory::Text("lots".into()).bytes().is_err());
    assert!(Memory::Text("5pb".into()).bytes().is_err());
}

#[test]
fn constraints_match_labels() {
    let labels = BTreeMap::from([("region".to_owned(), "eu".to_owned())]);
    assert!(Constraint::parse("region == eu").expect("valid").holds(&labels));
    assert!(!Constraint::parse("region != eu").expect("valid").holds(&labels));
    assert!(Constraint::parse("disk != ssd").expect("valid").holds(&labels));
    assert!(!Constraint::parse("disk == ssd").expect("valid").holds(&labels));
    assert!(Constraint::parse("region").is_err());
    assert!(Constraint::parse(" == eu").is_err());
}

#[test]
fn from_file_names_the_path() {
    let dir = std::env::temp_dir().join(format!("roost-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("roost.toml");
    std::fs::write(&path, "app = \"UPPER\"\n").expect("write");
    let error = AppConfig::from_file(&path).expect_err("invalid name");
    let text = error.to_string();
    assert!(text.contains("roost.toml") && text.contains("app:"), "{text}");
    let missing = AppConfig::from_file(&dir.join("nope.toml")).expect_err("missing");
    assert!(missing.to_string().contains("nope.toml"));
    std::fs::remove_dir_all(&dir).ok();
}

proptest! {
    #[test]
    fn parsing_arbitrary_text_never_panics(text in ".{0,400}") {
        if let Ok(config) = AppConfig::parse(&text) {
            let _ = config.validate();
        }
    }

    #[test]
    fn validating_arbitrary_values_never_panics(
        app in "[a-zA-Z0-9_-]{0,70}",
        cpus in -10.0f64..1000.0,
        memory in "[0-9]{0,12}[a-z]{0,3}",
        interval in "[0-9]{0,4}(ms|s|m|h|x)?",
        port in 0u16..,
    ) {
        let text = format!(
            "app = {app:?}\n[[vm]]\ncpus = {cpus}\nmemory = {memory:?}\n[http_service]\ninternal_port = {port}\n[[http_service.checks]]\ninterval = {interval:?}\n"
        );
        if let Ok(config) = AppConfig::parse(&text) {
            let _ = config.validate();
        }
    }
}

#[test]
fn commands_are_split_as_a_shell_splits_words_and_unclosed_quotes_are_refused() {
    assert_eq!(split_command("sh -c 'a && b'"), ["sh", "-c", "a && b"]);
    assert_eq!(split_command(r#"/app "two words" three\ four"#), ["/app", "two words", "three four"]);
    let text = "app = \"x\"\n[processes]\nweb = \"sh -c 'unclosed\"\n[deploy]\nrelease_command = \"migrate \\\"x\"\n";
    let found = problems(text);
    assert!(found.iter().any(|p| p.contains("processes.web") && p.contains("unclosed quote")), "{found:?}");
    assert!(found.iter().any(|p| p.contains("deploy.release_command") && p.contains("unclosed quote")), "{found:?}");
}

#[test]
fn kill_timeout_takes_seconds_or_a_duration_within_bounds() {
    let parsed = |line: &str| AppConfig::parse(&format!("{line}\napp = \"hello\"\n")).expect("parses");
    assert_eq!(parsed("kill_timeout = 30").kill_timeout.map(|k| k.duration()), Some(Ok(Duration::from_secs(30))));
    assert_eq!(parsed("kill_timeout = \"2m\"").kill_timeout.map(|k| k.duration()), Some(Ok(Duration::from_secs(120))));
    assert_eq!(AppConfig::parse("app = \"hello\"").expect("parses").kill_timeout, None);
    for (line, wanted) in [
        ("kill_timeout = 0", "from 1s to 300s"),
        ("kill_timeout = 301", "from 1s to 300s"),
        ("kill_timeout = \"1h\"", "from 1s to 300s"),
        ("kill_timeout = \"soon\"", "not a duration"),
    ] {
        let found = problems(&format!("{line}\napp = \"hello\"\n"));
        assert!(found.iter().any(|p| p.contains("kill_timeout") && p.contains(wanted)), "{line}: {found:?}");
    }
}

/// `[deploy] KEY = value` for each of `cases` (value, whether valid); an
/// invalid one is reported as `deploy.KEY: must be from 1 to MAX`.
fn check_deploy_range(key: &str, max: u32, cases: [(u32, bool); 4]) {
    for (value, valid) in cases {
        let found = problems(&format!("app = \"a\"\n[deploy]\n{key} = {value}\n"));
        assert_eq!(found.is_empty(), valid, "{key} = {value}: {found:?}");
        if !valid {
            assert!(found[0].starts_with(&format!("deploy.{key}: must be from 1 to {max}")), "{found:?}");
        }
    }
}

#[test]
fn initial_count_is_from_one_to_the_most_a_group_may_have() {
    check_deploy_range("initial_count", 10_000, [(0, false), (1, true), (10_000, true), (10_001, false)]);
}

#[test]
fn release_history_is_from_one_to_a_hundred() {
    check_deploy_range("release_history", 100, [(0, false), (1, true), (100, true), (101, false)]);
}
