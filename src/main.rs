//! `agora`: one binary for every part of Agora.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use agora_config::settings::{Overrides, Settings};
use agora_control_plane::domain::OrgKind;
use agora_control_plane::{demo, identity, AppState};
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use secrecy::ExposeSecret;

#[derive(Parser)]
#[command(
    name = "agora",
    version,
    about = "Marketplace and edge gateway for AI agents"
)]
struct Cli {
    /// Settings file (TOML). Environment variables AGORA_* override it; flags override both.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone, Default)]
struct Common {
    /// Directory for the embedded database and local state.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Control-plane listen address, e.g. 127.0.0.1:8000 (port 0 picks a free one).
    #[arg(long)]
    listen: Option<String>,
    /// postgres://… or sqlite://…; default: SQLite in the data directory.
    #[arg(long)]
    database_url: Option<String>,
}

#[derive(Args, Clone, Default)]
struct ProxyArgs {
    /// Directory for the saved snapshot.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Proxy listen address, e.g. 0.0.0.0:8080.
    #[arg(long)]
    listen: Option<String>,
    /// Admin (metrics) listen address.
    #[arg(long)]
    admin_listen: Option<String>,
    /// The control plane's base URL.
    #[arg(long)]
    control_plane_url: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything on the embedded database with demo content, and write DATA_DIR/demo.json.
    Up(Common),
    /// Run the control plane.
    ControlPlane(Common),
    /// Run the data plane (the gateway), fed by the control plane's snapshot feed.
    Proxy(ProxyArgs),
    /// Apply database migrations and exit.
    Migrate(Common),
    /// Manage users.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Manage user API tokens.
    Tokens {
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// Billing: compare usage, what was reported to Stripe, and Stripe's meters.
    Billing {
        #[command(subcommand)]
        command: BillingCommand,
    },
}

#[derive(Subcommand)]
enum BillingCommand {
    /// For each metered subscription and period: usage in the store, usage
    /// reported, and Stripe's meter event summary. Exits 1 when any differ.
    Reconcile {
        #[command(flatten)]
        common: Common,
        /// Only periods starting in this month (YYYY-MM, UTC).
        #[arg(long)]
        period: Option<String>,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum UsersCommand {
    /// Create a user; the password is read from standard input.
    Create {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        username: String,
        #[arg(long, default_value = "")]
        email: String,
        #[arg(long)]
        staff: bool,
        /// Also create an organization the user owns.
        #[arg(long)]
        org: Option<String>,
        /// customer or provider.
        #[arg(long, default_value = "customer")]
        org_kind: String,
    },
}

#[derive(Subcommand)]
enum TokensCommand {
    /// Create a token for a user and print it (shown once).
    Create {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        username: String,
    },
}

fn load_settings(config: Option<&PathBuf>, common: &Common) -> anyhow::Result<Settings> {
    let overrides = Overrides {
        data_dir: common.data_dir.clone(),
        listen: common.listen.clone(),
        database_url: common.database_url.clone(),
    };
    let settings = Settings::load(config.map(PathBuf::as_path), std::env::vars(), &overrides)?;
    keep_files_private(&settings)?;
    Ok(settings)
}

/// The data directory holds password hashes, signing keys, usage and the
/// snapshot: it is the owner's alone (0700, files 0600), whatever it was
/// before, and everything this process creates is made so (umask 077).
fn keep_files_private(settings: &Settings) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let dir = &settings.data_dir;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let private = |path: &std::path::Path, mode: u32| -> anyhow::Result<()> {
            let meta = std::fs::symlink_metadata(path)?;
            if !meta.file_type().is_symlink() && meta.permissions().mode() & 0o777 != mode {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                    .with_context(|| format!("making {} private", path.display()))?;
            }
            Ok(())
        };
        private(dir, 0o700)?;
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if std::fs::symlink_metadata(&path)?.is_file() {
                private(&path, 0o600)?;
            }
        }
        // Files configured outside the data directory.
        for path in [
            settings.proxy_snapshot_path(),
            settings.usage_embedded_path(),
            settings.usage_spill_path(),
        ] {
            if path.is_file() {
                private(&path, 0o600)?;
            }
        }
    }
    Ok(())
}

fn init_logging(settings: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_new(&settings.log.filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Up(common) => {
            let settings = load_settings(cli.config.as_ref(), &common)?;
            init_logging(&settings);
            up(settings).await
        }
        Command::ControlPlane(common) => {
            let settings = load_settings(cli.config.as_ref(), &common)?;
            init_logging(&settings);
            let state = AppState::from_settings(&settings).await?;
            let listener = bind(&settings.control_plane.listen).await?;
            tracing::info!(addr = %listener.local_addr()?, "control plane listening");
            agora_control_plane::serve(listener, state, shutdown_signal()).await?;
            Ok(())
        }
        Command::Proxy(args) => {
            let common = Common {
                data_dir: args.data_dir.clone(),
                ..Common::default()
            };
            let mut settings = load_settings(cli.config.as_ref(), &common)?;
            if let Some(listen) = args.listen {
                settings.proxy.listen = listen;
            }
            if let Some(admin) = args.admin_listen {
                settings.proxy.admin_listen = admin;
            }
            if let Some(url) = args.control_plane_url {
                settings.proxy.control_plane_url = Some(url);
            }
            settings.validate()?;
            init_logging(&settings);
            let config = agora_proxy::ProxyConfig::from_settings(&settings)?;
            let metering = agora_proxy::open_metering(&settings).await?;
            let running =
                tokio::task::spawn_blocking(move || agora_proxy::start(config, metering)).await??;
            println!("proxy listening on http://{}", running.addr);
            println!("metrics on http://{}/metrics", running.admin_addr);
            tokio::task::spawn_blocking(move || running.wait()).await?;
            Ok(())
        }
        Command::Migrate(common) => {
            let settings = load_settings(cli.config.as_ref(), &common)?;
            init_logging(&settings);
            let db = agora_control_plane::db::Db::connect(&settings.database_url(), 1).await?;
            db.migrate().await?;
            // The usage store's tables (ClickHouse's DDL from deploy/clickhouse/, or
            // the embedded file's).
            let store = agora_usage::open(&settings).await?;
            println!(
                "migrations applied (database and {} usage store)",
                store.kind()
            );
            Ok(())
        }
        Command::Users {
            command:
                UsersCommand::Create {
                    common,
                    username,
                    email,
                    staff,
                    org,
                    org_kind,
                },
        } => {
            let settings = load_settings(cli.config.as_ref(), &common)?;
            let kind: OrgKind = org_kind.parse().map_err(anyhow::Error::msg)?;
            let mut password = String::new();
            std::io::stdin()
                .read_to_string(&mut password)
                .context("reading the password from standard input")?;
            let password = password.trim_end_matches(['\n', '\r']);
            let state = AppState::from_settings(&settings).await?;
            let user = identity::create_user(&state.db, &username, &email, password, staff).await?;
            println!("user {username} {user}");
            if let Some(org) = org {
                let org_uuid = identity::create_org(&state.db, &org, kind, "", user).await?;
                println!("organization {org:?} {org_uuid}");
            }
            Ok(())
        }
        Command::Billing {
            command:
                BillingCommand::Reconcile {
                    common,
                    period,
                    json,
                },
        } => {
            let settings = load_settings(cli.config.as_ref(), &common)?;
            init_logging(&settings);
            let agreed = reconcile(&settings, period.as_deref(), json).await?;
            if !agreed {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Tokens {
            command: TokensCommand::Create { common, username },
        } => {
            let settings = load_settings(cli.config.as_ref(), &common)?;
            let state = AppState::from_settings(&settings).await?;
            let user = identity::find_user(&state.db, &username)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no user {username:?}"))?;
            println!("{}", identity::create_token(&state.db, user).await?);
            Ok(())
        }
    }
}

/// `agora billing reconcile`; `Ok(false)` when any line differs.
async fn reconcile(settings: &Settings, period: Option<&str>, json: bool) -> anyhow::Result<bool> {
    use agora_control_plane::billing::{meter, Billing};
    let billing = Billing::from_settings(settings)?
        .ok_or_else(|| anyhow::anyhow!("billing is off: set [stripe] secret_key"))?;
    let db = agora_control_plane::db::Db::connect(&settings.database_url(), 2).await?;
    db.migrate().await?;
    let store = agora_usage::open(settings).await?;
    let within = period.map(month_range).transpose()?;
    let now = agora_control_plane::db::now_ms();
    let lines = meter::reconcile(&billing, &db, store.as_ref(), now, within).await?;
    let mut agreed = true;
    if !json {
        println!("subscription                          unit      period start              store   reported     stripe  test-mode  ok");
    }
    for line in &lines {
        agreed &= line.agrees();
        if json {
            println!("{}", serde_json::to_string(line)?);
        } else {
            println!(
                "{}  {:<8}  {:<20}  {:>9}  {:>9}  {:>9}  {:>9}  {}",
                line.subscription,
                line.unit,
                agora_control_plane::domain::ts(line.period_start),
                line.store,
                line.reported,
                line.stripe,
                line.test_mode,
                if line.agrees() { "yes" } else { "DIFFERS" }
            );
        }
    }
    if !json {
        println!(
            "{} line(s); {}",
            lines.len(),
            if agreed { "all agree" } else { "some differ" }
        );
    }
    Ok(agreed)
}

/// `YYYY-MM` as a UTC month in unix ms.
fn month_range(text: &str) -> anyhow::Result<agora_usage::TimeRange> {
    let bad = || anyhow::anyhow!("--period must be YYYY-MM, e.g. 2026-12");
    let (year, month) = text.split_once('-').ok_or_else(bad)?;
    let year: i32 = year.parse().map_err(|_| bad())?;
    let month: u8 = month.parse().map_err(|_| bad())?;
    let month = time::Month::try_from(month).map_err(|_| bad())?;
    let start = time::Date::from_calendar_date(year, month, 1)
        .map_err(|_| bad())?
        .midnight()
        .assume_utc();
    agora_control_plane::quota::period(agora_config::snapshot::BillingInterval::Month, start)
}

async fn bind(addr: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let addr: SocketAddr = addr
        .parse()
        .with_context(|| format!("listen address {addr:?}"))?;
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))
}

/// `agora up`: the control plane on the embedded database, seeded with a demo,
/// the proxy in front of the agent runtime, and the demo runtime unless one is
/// configured.
async fn up(mut settings: Settings) -> anyhow::Result<()> {
    let listener = bind(&settings.control_plane.listen).await?;
    let addr = listener.local_addr()?;
    // Without a Stripe account configured, payments are local test payments:
    // a Stripe stand-in on loopback, whose events reach this control plane.
    let local_stripe = match settings.stripe.secret_key {
        Some(_) => None,
        None => {
            let webhook = agora_stripe_local::WebhookTarget::new(format!(
                "http://{addr}/api/stripe/webhook/"
            ));
            let stripe = agora_stripe_local::start(
                bind("127.0.0.1:0").await?,
                agora_stripe_local::Options {
                    webhooks: vec![webhook],
                    ..Default::default()
                },
            )
            .await?;
            let st = &mut settings.stripe;
            st.api_base = stripe.url();
            st.secret_key = Some(stripe.secret_key().to_owned().into());
            st.publishable_key = Some(stripe.publishable_key().to_owned());
            st.webhook_secret = stripe.webhook_secret().map(|s| s.to_owned().into());
            st.allowed_redirect_hosts
                .extend(["127.0.0.1".to_owned(), "localhost".to_owned()]);
            Some(stripe)
        }
    };
    let mut state = AppState::from_settings(&settings).await?;
    if local_stripe.is_some() {
        // The stand-in keeps nothing between runs: forget what an earlier run
        // made in it, so it is made again.
        agora_control_plane::billing::forget_catalog(&state.db).await?;
    }
    if state.proxy_secret.is_none() {
        // The proxy runs in this process: a secret for this run is enough.
        state.proxy_secret = Some(format!("up-{}", uuid::Uuid::new_v4().simple()).into());
    }
    let built_in = match state.runtime {
        Some(_) => None,
        None => Some(start_demo_runtime(&mut state).await?),
    };
    let url = settings
        .control_plane
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));

    let mut proxy_config = agora_proxy::ProxyConfig::from_settings(&settings)?;
    proxy_config.control_plane_url = format!("http://{addr}");
    proxy_config.proxy_secret = state.proxy_secret.clone();
    proxy_config.handle_signals = false;
    proxy_config.work_stealing = true;
    if let Some(runtime) = &built_in {
        proxy_config.runtime_api_key = Some(runtime.api_key.clone().into());
    }
    // Usage reports from the runtime are on: with the configured secret, else
    // with the one an earlier run wrote to demo.json, else a new one.
    let runtime_secret = match &settings.proxy.runtime_secret {
        Some(secret) => secret.expose_secret().to_owned(),
        None => demo::previous_runtime_secret(&settings.data_dir)
            .unwrap_or_else(|| format!("rs-{}", uuid::Uuid::new_v4().simple())),
    };
    proxy_config.runtime_secret = Some(runtime_secret.clone().into());
    let metering = agora_proxy::open_metering(&settings).await?;
    let proxy =
        tokio::task::spawn_blocking(move || agora_proxy::start(proxy_config, metering)).await??;
    let proxy_url = format!("http://{}", proxy.addr);
    if settings.proxy.public_url.is_none() {
        state.set_gateway_url(&proxy_url);
    }
    // A page on a second loopback origin that embeds the demo config's widget.
    let page_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let page_origin = format!("http://{}", page_listener.local_addr()?);
    let widget_demo_url = format!("{page_origin}/");
    let demo_proxy = demo::DemoProxy {
        url: proxy_url.clone(),
        metrics_url: format!("http://{}/metrics", proxy.admin_addr),
        runtime_secret: Some(runtime_secret),
        widget_demo_url: Some(widget_demo_url.clone()),
    };

    let info = demo::ensure(
        &state,
        &settings.data_dir,
        &url,
        built_in.as_ref(),
        Some(&demo_proxy),
    )
    .await?;
    let snippet = demo::widget_snippet(&state, info.config_uuid, &page_origin).await?;
    tokio::spawn(demo::serve_widget_page(
        page_listener,
        state.gateway_url(),
        snippet,
    ));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let state_db = state.db.clone();
    let server = tokio::spawn(agora_control_plane::serve(listener, state, async move {
        let _ = stop_rx.await;
    }));
    // The proxy is ready once it holds the control plane's current snapshot.
    let shared = proxy.gateway.shared.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !(shared.is_loaded() && shared.is_connected()) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the proxy did not receive its configuration from the control plane"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let demo_file = settings.data_dir.join("demo.json");
    let key_of = |field: &str| {
        format!(
            "$(sed -n 's/.*\"{field}\": \"\\(.*\\)\".*/\\1/p' {})",
            demo_file.display()
        )
    };
    println!("Agora is up.");
    println!("  API:           {proxy_url}  (agents and the whole API, one base URL)");
    println!("  control plane: {url}  (its own port, for operators)");
    println!("  metrics:       {}", demo_proxy.metrics_url);
    println!(
        "  chat widget:   {widget_demo_url}  (a page on another origin embedding the demo agent)"
    );
    println!(
        "  demo details:  {} (tokens, passwords and an API key)",
        demo_file.display()
    );
    println!("  {}", info.note);
    match &local_stripe {
        Some(stripe) => println!(
            "  payments:      LOCAL TEST PAYMENTS at {} (nothing leaves this machine; pay with 4242 4242 4242 4242)",
            stripe.url()
        ),
        None => println!("  payments:      Stripe ({})", settings.stripe.api_base),
    }
    println!();
    println!("Try it (the marketplace, then the buyer's agent):");
    println!(
        "  curl -s -H \"Authorization: Token {}\" {proxy_url}/api/marketplace-public-offerings/",
        key_of("buyer_token")
    );
    println!(
        "  curl -s -H \"Authorization: Bearer {}\" -H 'Content-Type: application/json' -d '{{\"input\": \"Hello, how can you help me?\"}}' {proxy_url}/api/agent-gateway/invoke/",
        key_of("api_key")
    );
    if let Some((offering, plan)) = pro_plan(&state_db).await? {
        println!();
        println!("Buy the Pro plan (order, then pay on the checkout page it answers):");
        println!(
            "  curl -s -H \"Authorization: Token {}\" -H 'Content-Type: application/json' -d '{{\"offering\": \"{offering}\", \"plan\": \"{plan}\"}}' {proxy_url}/api/marketplace-orders/",
            key_of("buyer_token")
        );
        println!(
            "  curl -s -H \"Authorization: Token {}\" -H 'Content-Type: application/json' -d '{{\"order_uuid\": \"<order uuid>\", \"success_url\": \"{proxy_url}/api/marketplace-orders/\", \"cancel_url\": \"{proxy_url}/api/marketplace-orders/\"}}' {proxy_url}/api/stripe/checkout/",
            key_of("buyer_token")
        );
    }
    println!();
    println!("Press Ctrl-C to stop.");
    shutdown_signal().await;
    // The proxy first: it drains its requests and ends its long poll of the
    // control plane, which then stops without waiting for that poll.
    tokio::task::spawn_blocking(move || proxy.shutdown()).await?;
    let _ = stop_tx.send(());
    server.await??;
    if let Some(stripe) = local_stripe {
        stripe.shutdown().await;
    }
    println!("Agora stopped.");
    Ok(())
}

/// The first published agent's Pro plan, for the printed purchase commands.
async fn pro_plan(db: &agora_control_plane::db::Db) -> anyhow::Result<Option<(String, String)>> {
    use sqlx::Row;
    let row = sqlx::query(
        "SELECT p.uuid, p.agent_uuid FROM pricing_plans p JOIN provider_agents a ON a.uuid = p.agent_uuid \
         WHERE p.name = 'Pro' AND p.active = 1 AND a.status = 'published' ORDER BY a.created_at, a.uuid",
    )
    .fetch_optional(&db.pool)
    .await?;
    Ok(match row {
        Some(row) => Some((row.try_get("agent_uuid")?, row.try_get("uuid")?)),
        None => None,
    })
}

/// Starts the built-in demo runtime on a free loopback port, gives it the
/// flows published on earlier runs, and points the control plane at it.
async fn start_demo_runtime(state: &mut AppState) -> anyhow::Result<demo::BuiltInRuntime> {
    let api_key = format!("demo-{}", uuid::Uuid::new_v4().simple());
    let runtime =
        agora_runtime::DemoRuntime::new(agora_runtime::RuntimeConfig::new(api_key.clone()));
    for (id, flow) in demo::provisioned_flows(state).await? {
        if let Ok(id) = id.parse() {
            runtime.load_flow(id, &flow);
        }
    }
    let listener = bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        if let Err(e) = runtime.serve(listener).await {
            tracing::error!(error = %e, "demo runtime stopped");
        }
    });
    state.runtime = Some(agora_control_plane::runtime::RuntimeClient::new(
        &url,
        api_key.clone().into(),
        std::time::Duration::from_secs(10),
    )?);
    tracing::info!(%url, "demo runtime listening");
    Ok(demo::BuiltInRuntime { url, api_key })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}
