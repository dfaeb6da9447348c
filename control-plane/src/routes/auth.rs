use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiResult};
use crate::extract::ApiJson;
use crate::{identity, AppState};

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
    user: uuid::Uuid,
}

/// `POST /api/auth/token/`: a new user token for valid credentials. Unknown
/// users and wrong passwords fail alike, in the same time.
pub async fn obtain_token(
    State(app): State<AppState>,
    ApiJson(body): ApiJson<Credentials>,
) -> ApiResult<Json<TokenAnswer>> {
    if body.username.len() > 150 || body.password.len() > 1024 {
        return Err(ApiError::bad_request(
            "invalid_credentials",
            "invalid username or password",
        ));
    }
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
    let user = identity::authenticate(&app.db, &body.username, &body.password).await;
    drop(permit);
    let user = user?.ok_or_else(|| {
        ApiError::bad_request("invalid_credentials", "invalid username or password")
    })?;
    let token = identity::create_token(&app.db, user).await?;
    Ok(Json(TokenAnswer { token, user }))
}
