//! The OpenAPI document, tested against the live API by schemathesis (PyPI),
//! through the gateway's front door, as a buyer and as a provider: no answer is
//! a 5xx, every error has the documented shape and content type.
//!
//! `./scripts/test.sh` installs schemathesis (cached) and names it in
//! `AGORA_SCHEMATHESIS`. The run is repeatable: `AGORA_SCHEMATHESIS_SEED`
//! (default below) picks the cases.

mod support;

use std::process::Command;

use support::*;

const DEFAULT_SEED: &str = "20261201";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_api_keeps_to_its_openapi_document() {
    let binary = std::env::var("AGORA_SCHEMATHESIS").unwrap_or_else(|_| {
        panic!("AGORA_SCHEMATHESIS names no schemathesis: run ./scripts/test.sh, which installs it")
    });
    let seed = std::env::var("AGORA_SCHEMATHESIS_SEED").unwrap_or_else(|_| DEFAULT_SEED.into());
    // With payments on (the local Stripe), so the billing routes are exercised too.
    let w = World::start_billed(
        None,
        support::Billed {
            grace_secs: 3600,
            report_window_secs: 3600,
            report_every_ms: 60_000,
        },
    )
    .await;
    let scratch = tempfile::tempdir().unwrap();
    let document = format!("{}/api/openapi.json", w.proxy_url);
    for (who, token) in [
        ("buyer", w.info.buyer_token.clone()),
        ("provider", w.info.provider_token.clone()),
    ] {
        // Its case cache stays out of the checkout.
        let run = Command::new(&binary)
            .current_dir(scratch.path())
            .args(["run", &document, "--no-color", "--seed", &seed])
            .args(["--header", &format!("Authorization: Token {token}")])
            .args([
                "--checks",
                "not_a_server_error,response_schema_conformance,content_type_conformance",
            ])
            // Logging out or changing the password would end the run's token.
            .args(["--exclude-operation-id", "delete_auth_token"])
            .args(["--exclude-operation-id", "post_auth_password"])
            .args(["--phases", "coverage,fuzzing", "--max-examples", "20"])
            .args(["--workers", "2", "--request-timeout", "30"])
            .output();
        let run = tokio::task::block_in_place(|| run).expect("schemathesis runs");
        let out = String::from_utf8_lossy(&run.stdout);
        let summary = out
            .lines()
            .find(|l| l.contains(" generated, "))
            .unwrap_or_else(|| panic!("no summary as the {who}:\n{out}"));
        eprintln!("schemathesis as the {who}: {}", summary.trim());
        // A check that failed on an answer fails the test. schemathesis's own
        // runtime errors (a case it could not generate) are not the API's and
        // are shown, not failed on, as long as the run tested the API at large.
        let failed = out.contains("=== FAILURES ===") || summary.contains("failed");
        assert!(
            !failed,
            "schemathesis as the {who} (seed {seed}):\n{out}\n{}",
            String::from_utf8_lossy(&run.stderr)
        );
        if !run.status.success() {
            let errors: Vec<&str> = out.lines().filter(|l| l.starts_with("___")).collect();
            eprintln!("schemathesis as the {who} could not test: {errors:?}");
        }
        let tested: u64 = summary
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(tested >= 1000, "too few cases as the {who}: {summary}");
    }
    w.finish().await;
}
