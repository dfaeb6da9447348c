//! Agora's control plane: the marketplace, orders, buyer configurations, API
//! keys and usage reads, over Postgres or embedded SQLite, served with axum.
//!
//! Routes are organised by feature under [`routes`]; every route is declared once
//! in [`api!`], which builds both the router and the OpenAPI document.

use std::future::Future;
use std::sync::Arc;

use agora_config::keys::SigningKey;
use agora_config::settings::Settings;
use axum::extract::DefaultBodyLimit;
use axum::response::IntoResponse;
use axum::Router;

pub mod billing;
pub mod db;
pub mod demo;
pub mod domain;
mod error;
mod extract;
mod flow_code;
pub mod identity;
pub mod login;
mod openapi;
pub mod quota;
pub mod routes;
pub mod runtime;
pub mod signing;
pub mod stripe;
pub mod sync;
pub mod widget;

use db::Db;
use domain::Paged;
use error::ApiError;
use extract::BodyLimit;

/// How often a replica re-reads the revision: the safety net under LISTEN on
/// Postgres; the mechanism itself on SQLite.
fn revision_poll(dialect: db::Dialect) -> std::time::Duration {
    match dialect {
        db::Dialect::Postgres => std::time::Duration::from_secs(5),
        db::Dialect::Sqlite => std::time::Duration::from_millis(100),
    }
}

/// Password checks allowed at once; more wait briefly, then get a 503.
pub const PASSWORD_CHECKS: usize = 4;

/// Limits the API enforces, from settings.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_page_size: u32,
    pub max_document_bytes: usize,
    /// Longest a request may take, body upload included.
    pub request_timeout: std::time::Duration,
    /// Open connections taken (0: from the descriptor limit), and per client
    /// address (0: no cap).
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    /// Longest a client may take to send a request's head (also how long an
    /// idle connection is kept).
    pub head_timeout: std::time::Duration,
}

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub limits: Arc<Limits>,
    pub signer: Arc<SigningKey>,
    pub runtime: Option<runtime::RuntimeClient>,
    /// The secret proxies present to read the snapshot feed; none turns it off.
    pub proxy_secret: Option<secrecy::SecretString>,
    /// The data-plane feed: revision watch and recent snapshots.
    pub feed: sync::Feed,
    /// Bounds concurrent password checks: each costs ~19 MiB and tens of ms.
    pub password_checks: Arc<tokio::sync::Semaphore>,
    /// The usage store the proxy writes; none when it could not be opened at
    /// start, and then the usage routes answer 503.
    pub usage: Option<Arc<dyn agora_usage::UsageStore>>,
    /// Payments through Stripe; none when no Stripe key is configured, and
    /// then paid orders cannot be checked out.
    pub billing: Option<Arc<billing::Billing>>,
    /// The gateways' public base URL, for widget snippets; a process that
    /// starts its gateway on a port it learns later sets it then.
    pub gateway_url: Arc<std::sync::RwLock<String>>,
}

impl AppState {
    /// Where widget snippets point browsers to.
    pub fn gateway_url(&self) -> String {
        self.gateway_url
            .read()
            .map(|u| u.clone())
            .unwrap_or_default()
    }

    pub fn set_gateway_url(&self, url: &str) {
        if let Ok(mut u) = self.gateway_url.write() {
            *u = url.trim_end_matches('/').to_owned();
        }
    }

    /// Connects, migrates, and loads (or creates) the key-signing key.
    pub async fn from_settings(settings: &Settings) -> anyhow::Result<AppState> {
        let db = Db::connect(
            &settings.database_url(),
            settings.control_plane.db_max_connections,
        )
        .await?;
        db.migrate().await?;
        let vault = signing::KeyVault::new(settings.control_plane.key_encryption_key.as_ref())?;
        let signer = signing::active_signing_key(&db, &vault).await?;
        let runtime = runtime::RuntimeClient::from_settings(&settings.runtime)?;
        // Settings outside the database (the runtime URL) shape the snapshot too:
        // a new revision makes proxies that saved the last one fetch it again.
        db::bump_revision(&mut *db.pool.acquire().await?).await?;
        tokio::task::spawn_blocking(identity::decoy_hash).await?;
        let usage = match agora_usage::open(settings).await {
            Ok(store) => Some(store),
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "the usage store could not be opened; usage routes will answer 503"
                );
                None
            }
        };
        let cp = &settings.control_plane;
        if let Some(store) = &usage {
            quota::start(
                db.clone(),
                store.clone(),
                std::time::Duration::from_millis(cp.quota_count_ms),
            );
        }
        let billing = billing::Billing::from_settings(settings)?.map(Arc::new);
        if let Some(billing) = &billing {
            tracing::info!(mode = ?billing.mode, stripe = billing.client.base_url(), "billing on");
            billing::start(billing.clone(), db.clone(), usage.clone());
        }
        Ok(AppState {
            billing,
            gateway_url: Arc::new(std::sync::RwLock::new(settings.gateway_public_url())),
            db: db.clone(),
            limits: Arc::new(Limits {
                max_body_bytes: cp.max_body_bytes,
                max_page_size: cp.max_page_size,
                max_document_bytes: cp.max_document_bytes,
                // Publishing waits for the runtime: leave it room.
                request_timeout: std::time::Duration::from_millis(
                    settings
                        .runtime
                        .timeout_ms
                        .saturating_add(5_000)
                        .max(60_000),
                ),
                max_connections: cp.max_connections,
                max_connections_per_client: cp.max_connections_per_client,
                head_timeout: std::time::Duration::from_millis(cp.head_timeout_ms.max(1)),
            }),
            signer: Arc::new(signer),
            runtime,
            proxy_secret: cp.proxy_secret.clone(),
            password_checks: Arc::new(tokio::sync::Semaphore::new(PASSWORD_CHECKS)),
            feed: sync::Feed::start(db.clone(), revision_poll(db.dialect)),
            usage,
        })
    }
}

/// One route of the API, as documented.
#[derive(Clone, Copy, Debug)]
pub struct RouteDoc {
    pub method: &'static str,
    pub path: &'static str,
    pub tag: &'static str,
    pub summary: &'static str,
    /// The JSON Schema of the request body, from the type the handler reads.
    pub body: Option<fn(&mut schemars::SchemaGenerator) -> schemars::Schema>,
    /// The JSON Schema of a successful answer, from the type the handler answers
    /// with; `None` for routes answering 204 without a body.
    pub answer: Option<fn(&mut schemars::SchemaGenerator) -> schemars::Schema>,
}

/// The schema of `T`, for [`RouteDoc::body`].
fn body_schema<T: schemars::JsonSchema>(
    generator: &mut schemars::SchemaGenerator,
) -> schemars::Schema {
    generator.subschema_for::<T>()
}

macro_rules! route_body {
    () => {
        None
    };
    ($body:ty) => {
        Some(body_schema::<$body>)
    };
}

impl RouteDoc {
    /// Routes anyone may call; every other route needs `Authorization: Token`.
    pub fn is_public(&self) -> bool {
        matches!(
            (self.method, self.path),
            ("post", "/api/auth/token/")
                | ("get", "/api/openapi.json")
                | ("get", "/api/stripe/config/")
                | ("post", "/api/stripe/webhook/")
        )
    }
}

macro_rules! api {
    ($($method:ident $path:literal => $handler:path, $tag:literal, $summary:literal $(, $body:ty)? $(=> $answer:ty)?;)*) => {
        /// Every route the control plane serves.
        pub const ROUTES: &[RouteDoc] = &[$(RouteDoc {
            method: stringify!($method),
            path: $path,
            tag: $tag,
            summary: $summary,
            body: route_body!($($body)?),
            answer: route_body!($($answer)?),
        }),*];

        fn api_router() -> Router<AppState> {
            Router::new()$(.route($path, axum::routing::$method($handler)))*
        }
    };
}

use routes::{
    agents, auth, billing as pay, configs, documents, keys, marketplace, orgs, usage,
    widget as embed,
};

api! {
    post "/api/auth/token/" => auth::obtain_token, "auth", "Exchange username and password for a user token", auth::Credentials => auth::TokenAnswer;
    delete "/api/auth/token/" => auth::logout, "auth", "Revoke the token of this request (log out)";
    get "/api/auth/tokens/" => auth::list_tokens, "auth", "Your live user tokens (never the tokens themselves)" => Vec<identity::TokenInfo>;
    delete "/api/auth/tokens/{id}/" => auth::revoke_token, "auth", "Revoke one of your tokens";
    post "/api/auth/password/" => auth::change_password, "auth", "Change your password: every token of yours is revoked and a new one answered", auth::PasswordChange => auth::TokenAnswer;
    get "/api/openapi.json" => openapi::document, "meta", "This OpenAPI document" => serde_json::Map<String, serde_json::Value>;

    get "/api/organizations/" => orgs::list_orgs, "organizations", "Organizations you belong to" => Paged<orgs::OrgAnswer>;
    post "/api/organizations/" => orgs::create_org, "organizations", "Create an organization you own", orgs::NewOrg => orgs::OrgAnswer;
    get "/api/organizations/{uuid}/" => orgs::get_org, "organizations", "One of your organizations" => orgs::OrgAnswer;
    post "/api/organizations/{uuid}/review/" => orgs::review_org, "organizations", "Approve a provider organization and allow or refuse its custom component code (staff)", orgs::ReviewBody => orgs::OrgAnswer;
    get "/api/organizations/{uuid}/usage/" => usage::organization_usage, "usage", "The organization's metered usage in a billing period (?from=&to=; default this calendar month, UTC)" => usage::OrganizationUsage;
    get "/api/organizations/{uuid}/members/" => orgs::list_members, "organizations", "The organization's members and roles" => Vec<orgs::MemberAnswer>;
    post "/api/organizations/{uuid}/members/" => orgs::put_member, "organizations", "Change a member's role (admins; ownership by owners); new members are invited", orgs::NewMember => Vec<orgs::MemberAnswer>;
    delete "/api/organizations/{uuid}/members/{user}/" => orgs::remove_member, "organizations", "Remove a member (the last owner stays)";
    get "/api/organizations/{uuid}/invitations/" => orgs::list_invitations, "organizations", "The organization's open invitations (admins)" => Vec<orgs::InvitationAnswer>;
    post "/api/organizations/{uuid}/invitations/" => orgs::invite, "organizations", "Invite a username to join (admins; ownership by owners); the same answer whether or not the name has an account", orgs::NewInvitation => orgs::InvitationAnswer;
    delete "/api/organizations/{uuid}/invitations/{invitation}/" => orgs::withdraw_invitation, "organizations", "Withdraw an open invitation (admins)";
    get "/api/invitations/" => orgs::my_invitations, "organizations", "Your open invitations" => Vec<orgs::InvitationAnswer>;
    post "/api/invitations/{uuid}/accept/" => orgs::accept_invitation, "organizations", "Accept an invitation and join the organization" => orgs::Joined;
    post "/api/invitations/{uuid}/decline/" => orgs::decline_invitation, "organizations", "Decline an invitation";
    get "/api/projects/" => orgs::list_projects, "organizations", "Projects of your organizations" => Paged<orgs::ProjectAnswer>;
    post "/api/projects/" => orgs::create_project, "organizations", "Create a project", orgs::NewProject => orgs::ProjectAnswer;
    get "/api/projects/{uuid}/" => orgs::get_project, "organizations", "One project" => orgs::ProjectAnswer;

    get "/api/marketplace-categories/" => marketplace::list_categories, "marketplace", "Categories" => Paged<marketplace::CategoryAnswer>;
    post "/api/marketplace-categories/" => marketplace::create_category, "marketplace", "Create a category (staff)", marketplace::NewCategory => marketplace::CategoryAnswer;
    get "/api/marketplace-categories/{uuid}/" => marketplace::get_category, "marketplace", "One category" => marketplace::CategoryAnswer;
    get "/api/marketplace-service-providers/" => marketplace::list_providers, "marketplace", "Service providers (sellers)" => Paged<marketplace::ProviderAnswer>;
    get "/api/marketplace-service-providers/{uuid}/" => marketplace::get_provider, "marketplace", "One service provider" => marketplace::ProviderAnswer;
    get "/api/marketplace-public-offerings/" => marketplace::list_offerings, "marketplace", "Published agents: search, category and provider filters, paging" => Paged<marketplace::OfferingAnswer>;
    get "/api/marketplace-public-offerings/{uuid}/" => marketplace::get_offering, "marketplace", "One published agent with its plans" => marketplace::OfferingAnswer;
    get "/api/marketplace-orders/" => marketplace::list_orders, "marketplace", "Your organization's orders" => Paged<marketplace::OrderAnswer>;
    post "/api/marketplace-orders/" => marketplace::create_order, "marketplace", "Order an offering's plan", marketplace::NewOrder => marketplace::OrderAnswer;
    get "/api/marketplace-orders/{uuid}/" => marketplace::get_order, "marketplace", "One order" => marketplace::OrderAnswer;
    get "/api/marketplace-resources/" => marketplace::list_resources, "marketplace", "Your organization's subscribed resources" => Paged<marketplace::ResourceAnswer>;
    get "/api/marketplace-resources/{uuid}/" => marketplace::get_resource, "marketplace", "One resource" => marketplace::ResourceAnswer;

    get "/api/provider-agents/" => agents::list_agents, "provider", "Your agents" => Paged<agents::AgentAnswer>;
    post "/api/provider-agents/" => agents::create_agent, "provider", "Create an agent", agents::NewAgent => agents::AgentAnswer;
    post "/api/provider-agents/validate_flow/" => agents::validate_flow, "provider", "Validate a Langflow export (the body) without storing it" => agents::ValidatedFlow;
    get "/api/provider-agents/{uuid}/" => agents::get_agent, "provider", "One agent" => agents::AgentAnswer;
    patch "/api/provider-agents/{uuid}/" => agents::update_agent, "provider", "Update an agent", agents::AgentPatch => agents::AgentAnswer;
    delete "/api/provider-agents/{uuid}/" => agents::delete_agent, "provider", "Delete a draft agent nobody ordered";
    post "/api/provider-agents/{uuid}/import_flow/" => agents::import_flow, "provider", "Import a Langflow export (the body) into the agent" => agents::AgentAnswer;
    post "/api/provider-agents/{uuid}/publish/" => agents::publish, "provider", "Provision the flow to the runtime and list the agent" => agents::AgentAnswer;
    post "/api/provider-agents/{uuid}/unpublish/" => agents::unpublish, "provider", "Withdraw the agent from the marketplace" => agents::AgentAnswer;
    get "/api/provider-agents/{uuid}/plans/" => agents::list_plans, "provider", "The agent's pricing plans" => Vec<marketplace::PlanAnswer>;
    post "/api/provider-agents/{uuid}/plans/" => agents::create_plan, "provider", "Add a pricing plan", agents::NewPlan => marketplace::PlanAnswer;
    delete "/api/provider-agents/{uuid}/plans/{plan}/" => agents::archive_plan, "provider", "Archive a pricing plan (existing subscriptions keep it)" => marketplace::PlanAnswer;
    get "/api/provider-agents/{uuid}/usage/" => usage::agent_usage, "usage", "The agent's usage over all its buyers: totals and an hourly or daily series (?from=&to=&interval=hour|day)" => usage::AgentUsage;

    get "/api/customer-agent-configs/" => configs::list_configs, "buyer", "Your agent configurations" => Paged<configs::ConfigAnswer>;
    get "/api/customer-agent-configs/{uuid}/" => configs::get_config, "buyer", "One configuration" => configs::ConfigAnswer;
    patch "/api/customer-agent-configs/{uuid}/" => configs::update_config, "buyer", "Set name, greeting, tone, knowledge documents and widget settings", configs::ConfigPatch => configs::ConfigAnswer;
    get "/api/customer-agent-configs/{uuid}/api_keys/" => keys::list_keys, "buyer", "The configuration's API keys (never the secret)" => Vec<keys::KeyAnswer>;
    post "/api/customer-agent-configs/{uuid}/api_keys/" => keys::issue_key, "buyer", "Issue an API key; the secret is shown once", keys::NewKey => keys::IssuedKey;
    get "/api/customer-agent-configs/{uuid}/widget_embed/" => embed::widget_embed, "buyer", "The snippet that embeds the chat widget (a publishable key is issued if there is none)" => embed::WidgetEmbed;
    get "/api/customer-agent-configs/{uuid}/usage/" => usage::config_usage, "usage", "The configuration's usage: totals and an hourly or daily series (?from=&to=&interval=hour|day)" => usage::ConfigUsage;
    post "/api/agent-api-keys/{uuid}/revoke/" => keys::revoke_key, "buyer", "Revoke an API key" => keys::KeyAnswer;
    get "/api/training-documents/" => documents::list_documents, "buyer", "Knowledge documents" => Paged<documents::DocumentAnswer>;
    post "/api/training-documents/" => documents::upload_document, "buyer", "Upload a knowledge document (the body; ?filename=&config=)" => documents::DocumentAnswer;
    get "/api/training-documents/{uuid}/" => documents::get_document, "buyer", "One knowledge document's metadata" => documents::DocumentAnswer;
    delete "/api/training-documents/{uuid}/" => documents::delete_document, "buyer", "Delete a knowledge document";

    get "/api/stripe/config/" => pay::stripe_config, "billing", "Stripe's publishable key and mode (test, live or local)" => pay::StripeConfig;
    post "/api/stripe/checkout/" => pay::checkout, "billing", "A Checkout Session to pay a pending order", pay::CheckoutRequest => pay::CheckoutAnswer;
    post "/api/stripe/webhook/" => pay::webhook, "billing", "Stripe's signed event deliveries" => pay::WebhookAnswer;
    post "/api/stripe/portal/" => pay::portal, "billing", "A link to Stripe's customer portal", pay::PortalRequest => pay::PortalAnswer;
    get "/api/stripe-customers/" => pay::list_customers, "billing", "Your organizations' Stripe customers" => Paged<pay::CustomerAnswer>;
    get "/api/stripe-subscriptions/" => pay::list_subscriptions, "billing", "Your organizations' subscriptions" => Paged<pay::SubscriptionAnswer>;
    post "/api/stripe-subscriptions/{uuid}/cancel/" => pay::cancel_subscription, "billing", "Cancel a subscription at the period's end (default) or now", pay::CancelRequest => pay::SubscriptionAnswer;
    get "/api/stripe-payment-methods/" => pay::list_payment_methods, "billing", "Cards on file of your organizations' customers" => Vec<pay::PaymentMethodAnswer>;
}

/// The full application: API routes, JSON 404/405, body limit, a time limit
/// per request, and panics answered as JSON 500s.
pub fn app(state: AppState) -> Router {
    let limit = state.limits.max_body_bytes;
    let timeout = state.limits.request_timeout;
    api_router()
        .route("/internal/v1/snapshot", axum::routing::get(sync::snapshot))
        .route("/internal/v1/changes", axum::routing::get(sync::changes))
        .route("/metrics", axum::routing::get(metrics))
        .route("/health/live/", axum::routing::get(live))
        .route("/health/ready/", axum::routing::get(ready))
        .fallback(|| async { ApiError::not_found("route") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::Extension(BodyLimit(limit)))
        .layer(axum::middleware::from_fn(move |req, next| {
            refuse_declared_oversize(limit, req, next)
        }))
        .layer(axum::middleware::map_response(safe_headers))
        .layer(axum::middleware::from_fn(move |req, next| {
            time_limit(timeout, req, next)
        }))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            ApiError::Unexpected(anyhow::anyhow!("a request handler panicked")).into_response()
        }))
        .with_state(state)
}

/// For orchestrators: the process answers.
async fn live() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "alive"}))
}

/// For orchestrators: 503 while the database does not answer within 2 s.
async fn ready(axum::extract::State(app): axum::extract::State<AppState>) -> impl IntoResponse {
    let check = sqlx::query("SELECT 1").execute(&app.db.pool);
    let ok = matches!(
        tokio::time::timeout(std::time::Duration::from_secs(2), check).await,
        Ok(Ok(_))
    );
    let (status, reason) = if ok {
        (axum::http::StatusCode::OK, None)
    } else {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Some("database_unreachable"),
        )
    };
    (
        status,
        axum::Json(serde_json::json!({"ready": ok, "reason": reason})),
    )
}

/// Prometheus exposition of the control plane's own counters (billing), on
/// its own port only (the front door passes only `/api/*`).
async fn metrics(axum::extract::State(app): axum::extract::State<AppState>) -> impl IntoResponse {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = String::new();
    if let Some(b) = &app.billing {
        let m = &b.metrics;
        let _ = writeln!(out, "# HELP agora_billing_webhooks_total Stripe webhook events handled, by outcome.\n# TYPE agora_billing_webhooks_total counter");
        let _ = writeln!(
            out,
            "agora_billing_webhooks_total{{outcome=\"applied\"}} {}",
            m.webhooks_handled.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "agora_billing_webhooks_total{{outcome=\"duplicate\"}} {}",
            m.webhooks_duplicate.load(Relaxed)
        );
        let _ = writeln!(out, "# HELP agora_billing_webhook_failures_total Stripe webhook deliveries refused or not handled, by reason.\n# TYPE agora_billing_webhook_failures_total counter");
        let failures = m
            .webhook_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (reason, n) in failures {
            let _ = writeln!(
                out,
                "agora_billing_webhook_failures_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# HELP agora_billing_meter_events_total Meter events Stripe accepted.\n# TYPE agora_billing_meter_events_total counter\nagora_billing_meter_events_total {}", m.meter_events_sent.load(Relaxed));
        let _ = writeln!(out, "# HELP agora_billing_meter_event_failures_total Meter event sends that failed (they stay pending).\n# TYPE agora_billing_meter_event_failures_total counter\nagora_billing_meter_event_failures_total {}", m.meter_event_failures.load(Relaxed));
        let _ = writeln!(out, "# HELP agora_billing_unreported_windows Usage reports written but not yet accepted by Stripe.\n# TYPE agora_billing_unreported_windows gauge\nagora_billing_unreported_windows {}", m.unreported_windows.load(Relaxed));
        let _ = writeln!(out, "# HELP agora_billing_report_lag_seconds Age of the oldest unsent usage report.\n# TYPE agora_billing_report_lag_seconds gauge\nagora_billing_report_lag_seconds {}", m.report_lag_secs.load(Relaxed));
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
}

/// A body declared larger than the limit is answered 413 before any of it is
/// read.
async fn refuse_declared_oversize(
    limit: usize,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return ApiError::PayloadTooLarge { limit }.into_response();
    }
    next.run(req).await
}

/// Every answer: not to be sniffed as another type, and, since answers carry
/// tokens, keys and tenants' data, never stored by a cache (the OpenAPI
/// document excepted).
async fn safe_headers(
    uri: axum::http::Uri,
    mut response: axum::response::Response,
) -> axum::response::Response {
    use axum::http::{header, HeaderValue};
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if uri.path() != "/api/openapi.json" {
        headers
            .entry(header::CACHE_CONTROL)
            .or_insert(HeaderValue::from_static("no-store"));
    }
    response
}

async fn time_limit(
    limit: std::time::Duration,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout.into_response(),
    }
}

/// Serves until `shutdown` resolves, then finishes in-flight requests.
///
/// Each connection must send a request's head within `head_timeout` (idle
/// connections are closed after as long), and connections over the caps of
/// [`Limits`] are answered at once (503, or 429 for one address over its share)
/// and closed, so slow or idle clients cannot starve the rest.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use agora_config::connections::ConnectionLimits;
    let connections = ConnectionLimits::new(
        state.limits.max_connections,
        state.limits.max_connections_per_client,
        1,
    );
    tracing::info!(
        max = connections.max(),
        per_client = state.limits.max_connections_per_client,
        "connection caps"
    );
    let head_timeout = state.limits.head_timeout;
    let router = app(state);
    let (stop, stopping) = tokio::sync::watch::channel(false);
    // Every connection task holds a sender: all are done when `recv` sees none.
    let (done, mut all_done) = tokio::sync::mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept:
                    // keep serving the connections there are.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let slot = match connections.admit(Some(peer.ip())) {
            Ok(slot) => slot,
            Err(refusal) => {
                tokio::spawn(refuse_connection(stream, refusal));
                continue;
            }
        };
        let router = router.clone();
        let mut stopping = stopping.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    tower::ServiceExt::oneshot(router.clone(), req)
                },
            );
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(head_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stopping.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(slot);
            drop(done);
        });
    }
    let _ = stop.send(true);
    drop(done);
    let _ = all_done.recv().await;
    Ok(())
}

/// Answers a connection over a cap without reading it, and closes it.
async fn refuse_connection(
    mut stream: tokio::net::TcpStream,
    refusal: agora_config::connections::Refusal,
) {
    use agora_config::connections::Refusal;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (status, message) = match refusal {
        Refusal::Full => (
            "503 Service Unavailable",
            "the control plane has as many connections as it takes; retry shortly",
        ),
        Refusal::ClientFull => (
            "429 Too Many Requests",
            "too many connections from this address; close some and retry",
        ),
    };
    let body = serde_json::json!({"error": {"code": "too_many_connections", "message": message}})
        .to_string();
    let answer = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
        // What the client sent meanwhile is read and dropped, so it reads the
        // answer rather than a reset.
        let mut sink = [0u8; 4096];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}
