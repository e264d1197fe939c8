//! The `roost` binary: parses arguments, sets up tracing and the runtime,
//! and hands over to the library. Node commands run the daemon until SIGINT
//! or SIGTERM; everything else is a client call.

use std::process::ExitCode;

use clap::Parser;
use roost_node::cli::{self, Cli, CliError, Command, NodeCommand};
use roost_node::daemon::{ExitReason, Node, Start};
use tokio_util::sync::CancellationToken;

/// Exit code of a node that the cluster removed.
const EXIT_REMOVED: u8 = 10;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Node(NodeCommand::Init { node, cluster }) => match cluster.settings() {
                Ok(settings) => run_node(&node, Start::Init, settings).await,
                Err(error) => Err(error),
            },
            Command::Node(NodeCommand::Join { seed, token, node }) => {
                run_node(&node, Start::Join { seed, token }, Default::default()).await
            }
            command => {
                init_tracing("warn");
                cli::run_client(command, &mut std::io::stdout().lock()).await.map(|()| ExitCode::SUCCESS)
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(error.exit_code() as u8)
        }
    }
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ROOST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
}

async fn run_node(
    args: &cli::NodeArgs,
    start: Start,
    cluster: roost_node::daemon::ClusterSettings,
) -> Result<ExitCode, CliError> {
    // openraft reports every failed RPC to a down peer, twice a second; the
    // node logs what matters (leader changes, nodes down and up) itself.
    // ROOST_LOG=info,openraft=warn brings openraft's own lines back.
    // boringtun logs every peer change and handshake retry; the mesh logs
    // what a user needs.
    init_tracing("info,openraft=off,boringtun=error");
    let resolv_conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let host = cli::Host { name: hostname(), upstream_dns: roost_network::dns::parse_resolv_conf(&resolv_conf) };
    let config = cli::node_config(args, start, cluster, host)?;
    let shutdown = CancellationToken::new();
    let node = Node::start(config, shutdown.clone())
        .await
        .map_err(|e| CliError::Other(format!("{:#}", anyhow::Error::new(e))))?;
    if let Some(tokens) = &node.init_tokens {
        print!("{}", cli::init_banner(tokens, &node.address, node.data_dir.root(), &node.name));
    } else {
        let role = if node.consensus.state().read(|s| s.is_worker(node.id)) {
            " as a worker: it runs apps and never votes"
        } else {
            ""
        };
        println!("Node {} (id {}) is serving at {}{role}.", node.name, node.id, node.address);
    }
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        shutdown.cancel();
    });
    match node.wait().await {
        ExitReason::Shutdown => Ok(ExitCode::SUCCESS),
        ExitReason::Removed => {
            eprintln!("error: this node was removed from the cluster; wipe its data directory to join again");
            Ok(ExitCode::from(EXIT_REMOVED))
        }
    }
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the node");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The machine's host name, made into a valid node name where possible.
fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String =
        raw.trim().to_ascii_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    name.trim_matches('-').to_owned()
}
