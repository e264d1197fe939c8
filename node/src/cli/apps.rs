//! The workload commands: deploy, status, releases, rollback, scale,
//! restart, logs and secrets.
//!
//! Commands that make a release (deploy, rollback, secrets set, scale vm)
//! follow it to the end by polling `GetStatus`, print each instance as it
//! starts and passes its checks, and exit non-zero with the reason when the
//! deploy fails; `--detach` returns as soon as the release exists.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use futures::StreamExt;
use roost_deploy::config::AppConfig;
use roost_proto::api::{
    deploy_event, deploy_request, AppRequest, AppStatus, DeployRequest, DeployStart, GetStatusRequest,
    ListReleasesRequest, LogsRequest, ReadOptions, RollbackRequest, ScaleRequest, ScaleVmRequest, SetSecretsRequest,
    UnsetSecretsRequest,
};
use tokio::time::Instant;

use super::{about_app, output, CliError, ClientArgs, Control};

/// Chunks of a build context or image on the wire.
const CHUNK: usize = 1 << 20;
/// How long the CLI follows a release before it gives up watching (the
/// cluster's own deploy timeout is shorter, so this is a safety net).
const FOLLOW_AT_MOST: Duration = Duration::from_secs(600);

#[derive(Debug, Args)]
pub struct AppArg {
    /// The app [default: `app` in ./roost.toml].
    #[arg(short = 'a', long = "app")]
    pub app: Option<String>,
}

impl AppArg {
    /// The app named by -a, or by the roost.toml in the current directory.
    pub fn resolve(&self) -> Result<String, CliError> {
        if let Some(app) = &self.app {
            return Ok(app.clone());
        }
        match AppConfig::from_file(Path::new("roost.toml")) {
            Ok(config) => Ok(config.app),
            Err(_) => Err(CliError::Usage("which app? pass -a APP (or run this where roost.toml is)".into())),
        }
    }
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The app's directory: its roost.toml and build context.
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// The roost.toml to use [default: DIR/roost.toml].
    #[arg(short = 'c', long = "config")]
    pub config: Option<PathBuf>,
    /// Deploy this image (in the node's Docker engine or this machine's) instead of building.
    #[arg(long)]
    pub image: Option<String>,
    /// rolling, immediate, bluegreen or canary [default: roost.toml's, else rolling].
    #[arg(long)]
    pub strategy: Option<String>,
    /// Return once the release exists, without following it.
    #[arg(long)]
    pub detach: bool,
    #[command(flatten)]
    pub app: AppArg,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Subcommand)]
pub enum ScaleCommand {
    /// Set how many instances of a process group run.
    Count {
        count: u32,
        #[command(flatten)]
        app: AppArg,
        /// The process group [default: app].
        #[arg(long, default_value = "app")]
        process_group: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Change the CPU and memory of the instances (a new release).
    Vm {
        #[arg(long)]
        cpus: f64,
        /// "256mb", "1gb".
        #[arg(long)]
        memory: String,
        #[command(flatten)]
        app: AppArg,
        /// Only this process group [default: all].
        #[arg(long)]
        process_group: Option<String>,
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// Set secrets (NAME=VALUE ...); makes a new release unless --stage.
    Set {
        #[arg(required = true, value_name = "NAME=VALUE")]
        pairs: Vec<String>,
        #[command(flatten)]
        app: AppArg,
        /// Store them for the next release without making one now.
        #[arg(long)]
        stage: bool,
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List secret names, digests and dates (never values).
    List {
        #[command(flatten)]
        app: AppArg,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove secrets; makes a new release unless --stage.
    Unset {
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        #[command(flatten)]
        app: AppArg,
        #[arg(long)]
        stage: bool,
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    pub app: AppArg,
    /// Keep printing new output, including that of instances that start later.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only this instance.
    #[arg(long)]
    pub instance: Option<String>,
    /// Lines of history per instance [default: all].
    #[arg(short = 'n', long)]
    pub lines: Option<u32>,
    /// Only output newer than this, e.g. 10m.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,
    #[command(flatten)]
    pub client: ClientArgs,
}

fn io(e: std::io::Error) -> CliError {
    CliError::Other(format!("could not write output: {e}"))
}

/// `roost deploy`.
pub async fn deploy(args: DeployArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let config_path = args.config.clone().unwrap_or_else(|| args.dir.join("roost.toml"));
    if !config_path.is_file() {
        return Err(CliError::Usage(format!(
            "no roost.toml at {}: write one (see docs/roost-toml.md; `app = \"NAME\"` is enough to start) or pass -c PATH",
            config_path.display()
        )));
    }
    let config = AppConfig::from_file(&config_path).map_err(|e| CliError::Invalid(e.to_string()))?;
    let problems = config.validate();
    if !problems.is_empty() {
        let list: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
        return Err(CliError::Invalid(format!("{} has problems:\n{}", config_path.display(), list.join("\n"))));
    }
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| CliError::Usage(format!("could not read {}: {e}", config_path.display())))?;
    let app = args.app.app.clone().unwrap_or_else(|| config.app.clone());
    let image = args.image.clone().or_else(|| config.build.image.clone());
    let dockerfile = config.build.dockerfile.clone().unwrap_or_else(|| "Dockerfile".into());
    let mut client = args.client.connect().await?;
    let start = DeployStart {
        app: app.clone(),
        config: text,
        image: image.clone().unwrap_or_default(),
        image_upload: false,
        strategy: args.strategy.clone().unwrap_or_default(),
        dockerfile: dockerfile.clone(),
    };

    let body: Vec<Vec<u8>> = match &image {
        Some(_) => Vec::new(),
        None => {
            if !args.dir.join(&dockerfile).is_file() {
                return Err(CliError::Usage(format!(
                    "no {dockerfile} in {}: add one, or deploy an image with --image (or [build] image in roost.toml)",
                    args.dir.display()
                )));
            }
            let (tar, files) = roost_deploy::pack::pack(&args.dir, &dockerfile)
                .map_err(|e| CliError::Usage(format!("could not pack {}: {e}", args.dir.display())))?;
            writeln!(out, "==> Sending {} ({files} files, {} KiB)", args.dir.display(), tar.len() / 1024)
                .map_err(io)?;
            tar.chunks(CHUNK).map(<[u8]>::to_vec).collect()
        }
    };
    let version = match send_deploy(&mut client, start.clone(), body, out).await {
        Err(Sent::ImageMissing(message)) if image.is_some() => {
            // The node lacks the image; this machine's engine may have it.
            let image = image.clone().unwrap_or_default();
            let chunks = local_image(&image).await.map_err(|local| {
                CliError::NotFound(format!("{message}; and this machine's Docker engine cannot provide it: {local}"))
            })?;
            writeln!(out, "==> Uploading image {image} from this machine").map_err(io)?;
            send_deploy(&mut client, DeployStart { image_upload: true, ..start }, chunks, out).await?
        }
        other => other?,
    };
    writeln!(out, "==> Release v{version} of {app} created").map_err(io)?;
    if args.detach {
        return Ok(());
    }
    follow_release(&mut client, &app, version, out).await
}

/// Saves an image from this machine's engine, in chunks.
async fn local_image(image: &str) -> Result<Vec<Vec<u8>>, String> {
    let engine = roost_deploy::engine::Engine::connect(None).await.map_err(|e| e.chain())?;
    if engine.image_id(image).await.map_err(|e| e.chain())?.is_none() {
        return Err(format!("it has no image {image} either"));
    }
    let mut stream = Box::pin(engine.export_image(image));
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.next().await {
        chunks.push(chunk.map_err(|e| e.chain())?.to_vec());
    }
    Ok(chunks)
}

/// Why a deploy did not make a release.
enum Sent {
    /// The node's engine lacks the image (the node says so in the status's
    /// metadata); this machine's engine may have it.
    ImageMissing(String),
    Failed(CliError),
}

impl From<CliError> for Sent {
    fn from(error: CliError) -> Self {
        Sent::Failed(error)
    }
}

impl From<tonic::Status> for Sent {
    fn from(status: tonic::Status) -> Self {
        if status.metadata().get(roost_proto::IMAGE_MISSING).is_some() {
            Sent::ImageMissing(status.message().to_owned())
        } else {
            Sent::Failed(status.into())
        }
    }
}

impl From<Sent> for CliError {
    fn from(sent: Sent) -> Self {
        match sent {
            Sent::ImageMissing(message) => CliError::NotFound(message),
            Sent::Failed(error) => error,
        }
    }
}

async fn send_deploy(
    client: &mut Control,
    start: DeployStart,
    body: Vec<Vec<u8>>,
    out: &mut dyn Write,
) -> Result<u64, Sent> {
    let app = start.app.clone();
    let first = DeployRequest { part: Some(deploy_request::Part::Start(start)) };
    let rest = body.into_iter().map(|chunk| DeployRequest { part: Some(deploy_request::Part::Chunk(chunk)) });
    let requests = futures::stream::iter(std::iter::once(first).chain(rest));
    let mut events = client.deploy(about_app(&app, requests)).await?.into_inner();
    while let Some(event) = events.message().await? {
        match event.event {
            Some(deploy_event::Event::BuildOutput(line)) => writeln!(out, "    {line}").map_err(io)?,
            Some(deploy_event::Event::Progress(text)) => writeln!(out, "==> {text}").map_err(io)?,
            Some(deploy_event::Event::Release(version)) => return Ok(version),
            None => {}
        }
        out.flush().map_err(io)?;
    }
    Err(Sent::Failed(CliError::Other("the node ended the deploy without naming a release".into())))
}

/// Follows a release until it is live or has failed, printing each change.
pub async fn follow_release(
    client: &mut Control,
    app: &str,
    version: u64,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    writeln!(out, "==> Waiting for v{version}'s instances to start and pass their checks").map_err(io)?;
    let started = Instant::now();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let status = match client
            .get_status(GetStatusRequest { app: app.to_owned(), read: Some(ReadOptions { stale: false }) })
            .await
        {
            Ok(status) => status.into_inner(),
            // An election or a restarting node: the deploy goes on; so does following it.
            Err(status)
                if matches!(status.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded)
                    && started.elapsed() < FOLLOW_AT_MOST =>
            {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(status) => return Err(status.into()),
        };
        for instance in status.instances.iter().filter(|i| i.release == version) {
            let line = instance_line(instance);
            if seen.get(&instance.id) != Some(&line) {
                writeln!(out, "    {line}").map_err(io)?;
                out.flush().map_err(io)?;
                seen.insert(instance.id.clone(), line);
            }
        }
        if status.release.as_ref().is_some_and(|r| r.version == version) {
            writeln!(out, "==> v{version} is live ({:.1}s)", started.elapsed().as_secs_f64()).map_err(io)?;
            output::status(out, &status, false).map_err(io)?;
            return Ok(());
        }
        if status.deploying.as_ref().is_none_or(|r| r.version != version) {
            let releases = client
                .list_releases(ListReleasesRequest { app: app.to_owned(), read: None })
                .await?
                .into_inner()
                .releases;
            let release = releases.iter().find(|r| r.version == version);
            // Live, then already replaced by a newer release between two looks.
            if release.is_some_and(|r| r.status == "superseded") {
                writeln!(out, "==> v{version} went live and has since been replaced").map_err(io)?;
                return Ok(());
            }
            let reason = release.map(|r| r.reason.clone()).unwrap_or_default();
            let serving = status.release.map(|r| format!("v{} keeps serving", r.version));
            return Err(CliError::Other(format!(
                "release v{version} failed and was rolled back: {reason}{}",
                serving.map(|s| format!("; {s}")).unwrap_or_default()
            )));
        }
        if started.elapsed() > FOLLOW_AT_MOST {
            return Err(CliError::Other(format!(
                "v{version} is still deploying after {}s; follow it with `roost status -a {app}`",
                FOLLOW_AT_MOST.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn instance_line(i: &roost_proto::api::Instance) -> String {
    let node = if i.node.is_empty() { "no node yet".to_owned() } else { format!("on {}", i.node) };
    let mut line = format!("instance {} ({}) {node}: {}", i.id, i.process_group, i.state);
    if i.health != "unknown" {
        line.push_str(&format!(", checks {}", i.health));
    }
    if !i.reason.is_empty() {
        line.push_str(&format!(" ({})", i.reason));
    }
    line
}

/// After a command that may have made a release: follow it unless detached.
async fn after_change(
    client: &mut Control,
    app: &str,
    release: Option<u64>,
    detach: bool,
    done: &str,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    match release {
        Some(version) => {
            writeln!(out, "==> {done}: release v{version}").map_err(io)?;
            if detach {
                Ok(())
            } else {
                follow_release(client, app, version, out).await
            }
        }
        None => writeln!(out, "{done}").map_err(io),
    }
}

pub async fn status(app: &AppArg, json: bool, client: &ClientArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let app = app.resolve()?;
    let status: AppStatus = client
        .connect()
        .await?
        .get_status(GetStatusRequest { app, read: Some(ReadOptions { stale: false }) })
        .await?
        .into_inner();
    output::status(out, &status, json).map_err(io)
}

pub async fn releases(app: &AppArg, json: bool, client: &ClientArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let app = app.resolve()?;
    let releases =
        client.connect().await?.list_releases(ListReleasesRequest { app, read: None }).await?.into_inner().releases;
    output::releases(out, &releases, json).map_err(io)
}

pub async fn rollback(
    app: &AppArg,
    version: Option<u64>,
    detach: bool,
    client: &ClientArgs,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let app = app.resolve()?;
    let mut control = client.connect().await?;
    let reply = control.rollback(about_app(&app, RollbackRequest { app: app.clone(), version })).await?.into_inner();
    after_change(&mut control, &app, reply.release, detach, "Rolling back", out).await
}

pub async fn scale(command: ScaleCommand, out: &mut dyn Write) -> Result<(), CliError> {
    match command {
        ScaleCommand::Count { count, app, process_group, client } => {
            let app = app.resolve()?;
            let mut control = client.connect().await?;
            let request = ScaleRequest { app: app.clone(), process_group: process_group.clone(), count };
            control.scale(about_app(&app, request)).await?;
            writeln!(out, "Scaling {app} {process_group} to {count} instance(s)").map_err(io)?;
            wait_for_scale(&mut control, &app, &process_group, count, out).await
        }
        ScaleCommand::Vm { cpus, memory, app, process_group, detach, client } => {
            let app = app.resolve()?;
            let mut control = client.connect().await?;
            let request = ScaleVmRequest {
                app: app.clone(),
                process_group: process_group.unwrap_or_default(),
                cpus,
                memory: memory.clone(),
            };
            let reply = control.scale_vm(about_app(&app, request)).await?.into_inner();
            after_change(&mut control, &app, reply.release, detach, &format!("Resizing to {cpus} CPU, {memory}"), out)
                .await
        }
    }
}

/// Waits until the group runs `count` instances, or explains why not.
async fn wait_for_scale(
    client: &mut Control,
    app: &str,
    group: &str,
    count: u32,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = client
            .get_status(GetStatusRequest { app: app.to_owned(), read: Some(ReadOptions { stale: false }) })
            .await?
            .into_inner();
        let group_instances: Vec<_> = status.instances.iter().filter(|i| i.process_group == group).collect();
        let running = group_instances.iter().filter(|i| i.state == "running").count();
        if group_instances.len() == count as usize && running == count as usize {
            writeln!(out, "{app} {group} runs {count} instance(s)").map_err(io)?;
            return output::status(out, &status, false).map_err(io);
        }
        // A reason that only says a node went away is fixed by placing again.
        let stuck = group_instances.iter().find(|i| i.node.is_empty() && !i.reason.is_empty() && !i.displaced);
        if let Some(stuck) = stuck {
            return Err(CliError::Invalid(format!("instance {} cannot be placed: {}", stuck.id, stuck.reason)));
        }
        if Instant::now() > deadline {
            output::status(out, &status, false).map_err(io)?;
            return Err(CliError::Other(format!(
                "{running} of {count} instance(s) run after 120s; see `roost status -a {app}`"
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn restart(app: &AppArg, client: &ClientArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let app = app.resolve()?;
    client.connect().await?.restart_app(about_app(&app, AppRequest { app: app.clone() })).await?;
    writeln!(out, "Restarting every instance of {app}, a wave at a time ([deploy] max_unavailable); `roost status -a {app}` follows it").map_err(io)
}

pub async fn secrets(command: SecretsCommand, out: &mut dyn Write) -> Result<(), CliError> {
    match command {
        SecretsCommand::Set { pairs, app, stage, detach, client } => {
            let app = app.resolve()?;
            let mut secrets = std::collections::HashMap::new();
            for pair in &pairs {
                // The argument may be a bare value: never echo it.
                let (name, value) = pair.split_once('=').ok_or_else(|| {
                    CliError::Usage("secrets are given as NAME=VALUE; one argument has no '='".into())
                })?;
                secrets.insert(name.to_owned(), value.to_owned());
            }
            let names: Vec<String> = secrets.keys().cloned().collect();
            let mut control = client.connect().await?;
            let reply = control
                .set_secrets(about_app(&app, SetSecretsRequest { app: app.clone(), secrets, stage }))
                .await?
                .into_inner();
            let done = format!("Set {}", names.join(", "));
            after_change(&mut control, &app, reply.release, detach, &done, out).await
        }
        SecretsCommand::Unset { names, app, stage, detach, client } => {
            let app = app.resolve()?;
            let mut control = client.connect().await?;
            let request = UnsetSecretsRequest { app: app.clone(), names: names.clone(), stage };
            let reply = control.unset_secrets(about_app(&app, request)).await?.into_inner();
            let done = format!("Unset {}", names.join(", "));
            after_change(&mut control, &app, reply.release, detach, &done, out).await
        }
        SecretsCommand::List { app, json, client } => {
            let app = app.resolve()?;
            let secrets = client.connect().await?.list_secrets(AppRequest { app }).await?.into_inner().secrets;
            output::secrets(out, &secrets, json).map_err(io)
        }
    }
}

pub async fn logs(args: LogsArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let app = args.app.resolve()?;
    let since = match args.since {
        Some(ago) => {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            now.saturating_sub(ago).as_secs() as i64
        }
        None => 0,
    };
    let request = LogsRequest {
        app,
        follow: args.follow,
        instance: args.instance.unwrap_or_default(),
        lines: args.lines.unwrap_or(0),
        since,
    };
    let mut lines = args.client.connect().await?.logs(request).await?.into_inner();
    while let Some(line) = lines.message().await? {
        if line.stream == "roost" {
            eprintln!("roost: {}", line.text);
            continue;
        }
        writeln!(out, "[{} {}] {}", line.instance, line.node, line.text).map_err(io)?;
        out.flush().map_err(io)?;
    }
    Ok(())
}

pub async fn set_suspended(
    name: String,
    suspend: bool,
    client: &ClientArgs,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let mut control = client.connect().await?;
    if suspend {
        control.suspend_app(about_app(&name, AppRequest { app: name.clone() })).await?;
        writeln!(out, "Suspended {name}: its instances stop; `roost apps resume {name}` brings them back").map_err(io)
    } else {
        control.resume_app(about_app(&name, AppRequest { app: name.clone() })).await?;
        writeln!(out, "Resumed {name}").map_err(io)
    }
}
