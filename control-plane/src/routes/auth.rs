use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath, Caller, ClientAddr};
use crate::identity::{self, TokenInfo};
use crate::login::{self, Subject};
use crate::AppState;

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    username: String,
    password: String,
}

/// A user token and whose it is.
#[derive(Serialize, schemars::JsonSchema)]
pub struct TokenAnswer {
    /// Sent as `Authorization: Token <token>`.
    token: String,
    /// The user's id.
    user: Uuid,
    expires_at: String,
}

fn invalid_credentials() -> ApiError {
    ApiError::bad_request("invalid_credentials", "invalid username or password")
}

/// Checks a password, one of at most `PASSWORD_CHECKS` at a time.
async fn check(app: &AppState, username: &str, password: &str) -> ApiResult<Option<Uuid>> {
    let permit = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        app.password_checks.clone().acquire_owned(),
    )
    .await
    .map_err(|_| ApiError::Unavailable {
        code: "login_busy",
        message: "too many logins at once; retry shortly".into(),
    })?
    .map_err(anyhow::Error::from)?;
    let user = identity::authenticate(&app.db, username, password).await;
    drop(permit);
    Ok(user?)
}

/// 429 `login_throttled`, with the wait, while any of `subjects` is locked.
async fn refuse_while_locked(app: &AppState, subjects: &[Subject]) -> ApiResult<()> {
    let wait = login::locked_for(&app.db, subjects).await?;
    if wait > 0 {
        return Err(ApiError::TooManyRequests {
            code: "login_throttled",
            message: "too many failed logins; wait before trying again".into(),
            retry_after_secs: (wait as u64).div_ceil(1000),
        });
    }
    Ok(())
}

async fn token_answer(app: &AppState, user: Uuid) -> ApiResult<TokenAnswer> {
    let token = identity::create_token(&app.db, user).await?;
    Ok(TokenAnswer {
        token,
        user,
        expires_at: crate::domain::ts(crate::db::now_ms() + identity::USER_TOKEN_TTL_MS),
    })
}

/// `POST /api/auth/token/`: a new user token for valid credentials. Unknown
/// users and wrong passwords fail alike, in the same time; repeated failures
/// of an account or of an address are slowed down (see [`login`]).
pub async fn obtain_token(
    State(app): State<AppState>,
    ClientAddr(addr): ClientAddr,
    ApiJson(body): ApiJson<Credentials>,
) -> ApiResult<Json<TokenAnswer>> {
    if body.username.chars().count() > identity::USERNAME_MAX_CHARS
        || body.password.chars().count() > identity::PASSWORD_MAX_CHARS
    {
        return Err(invalid_credentials());
    }
    let mut subjects = vec![Subject::Account(body.username.clone())];
    subjects.extend(addr.map(Subject::Address));
    refuse_while_locked(&app, &subjects).await?;
    let Some(user) = check(&app, &body.username, &body.password).await? else {
        login::failed(&app.db, &subjects).await?;
        return Err(invalid_credentials());
    };
    login::succeeded(&app.db, &body.username).await?;
    Ok(Json(token_answer(&app, user).await?))
}

/// `GET /api/auth/tokens/`: the caller's live tokens (never the tokens).
pub async fn list_tokens(
    State(app): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<TokenInfo>>> {
    Ok(Json(
        identity::list_tokens(&app.db, caller.user, &caller.token_hash).await?,
    ))
}

/// `DELETE /api/auth/tokens/{id}/`: revokes one of the caller's tokens.
pub async fn revoke_token(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    if identity::revoke_token(&app.db, caller.user, id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("token"))
    }
}

/// `DELETE /api/auth/token/`: revokes the token of this request (log out).
pub async fn logout(State(app): State<AppState>, caller: Caller) -> ApiResult<StatusCode> {
    identity::revoke_token_hash(&app.db, &caller.token_hash).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordChange {
    current_password: String,
    new_password: String,
}

/// `POST /api/auth/password/`: changes the caller's password, revokes all their
/// tokens and answers a new one.
pub async fn change_password(
    State(app): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<PasswordChange>,
) -> ApiResult<Json<TokenAnswer>> {
    let subjects = [Subject::Account(caller.username.clone())];
    refuse_while_locked(&app, &subjects).await?;
    if body.current_password.chars().count() > identity::PASSWORD_MAX_CHARS
        || check(&app, &caller.username, &body.current_password).await? != Some(caller.user)
    {
        login::failed(&app.db, &subjects).await?;
        return Err(ApiError::bad_request(
            "invalid_credentials",
            "the current password is wrong",
        ));
    }
    identity::check_password(&body.new_password, &caller.username)
        .map_err(|m| ApiError::bad_request("weak_password", m))?;
    identity::set_password(&app.db, &caller.username, &body.new_password).await?;
    Ok(Json(token_answer(&app, caller.user).await?))
}
