//! The OpenAPI 3 document, generated from the route table ([`crate::ROUTES`]):
//! every route served is in it, and nothing else.

use axum::Json;
use serde_json::{json, Map, Value};

use crate::ROUTES;

/// `GET /api/openapi.json`.
pub async fn document() -> Json<Value> {
    Json(build())
}

pub fn build() -> Value {
    let mut paths = Map::new();
    // Request bodies' schemas come from the types the handlers read; the types
    // they refer to land in `components.schemas`.
    let mut generator = schemars::generate::SchemaSettings::openapi3().into_generator();
    for route in ROUTES {
        let item = paths
            .entry(route.path.to_owned())
            .or_insert_with(|| json!({}));
        let params: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| {
                json!({
                    "name": name, "in": "path", "required": true,
                    "schema": { "type": "string", "format": "uuid" }
                })
            })
            .collect();
        let success = match route.answer {
            Some(schema) => {
                json!({ "description": "Success", "content": { "application/json": { "schema": schema(&mut generator) } } })
            }
            // A route without an answer type answers 204 with no body.
            None => json!({ "description": "Done; no body" }),
        };
        let mut op = json!({
            "operationId": operation_id(route.method, route.path),
            "summary": route.summary,
            "tags": [route.tag],
            "parameters": params,
            "responses": {
                "2XX": success,
                "4XX": { "$ref": "#/components/responses/Error" },
                "5XX": { "$ref": "#/components/responses/Error" }
            }
        });
        if route.is_public() {
            op["security"] = json!([]);
        }
        if matches!(route.method, "post" | "patch") && !NO_BODY.contains(&route.path) {
            // Routes without a body type take any object (a Langflow export) or
            // none at all.
            let media = match route.body {
                Some(schema) => json!({ "schema": schema(&mut generator) }),
                None => json!({ "schema": { "type": "object" } }),
            };
            op["requestBody"] = json!({
                "required": route.body.is_some() || route.method == "patch",
                "content": { "application/json": media }
            });
        }
        item[route.method] = op;
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Agora control plane",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Marketplace, orders, buyer configurations and API keys. Every object is scoped to the caller's organizations: another tenant's object is a 404."
        },
        "servers": [{ "url": "/" }],
        "security": [{ "userToken": [] }],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "userToken": {
                    "type": "apiKey", "in": "header", "name": "Authorization",
                    "description": "`Token <user token>` from POST /api/auth/token/"
                }
            },
            "schemas": schemas(generator, json!({
                "Error": {
                    "type": "object", "required": ["error"],
                    "properties": { "error": {
                        "type": "object", "required": ["code", "message"],
                        "properties": { "code": { "type": "string" }, "message": { "type": "string" } }
                    } }
                }
            })),
            "responses": {
                "Error": {
                    "description": "An error",
                    "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
                }
            }
        }
    })
}

/// Actions that read no request body.
const NO_BODY: &[&str] = &[
    "/api/provider-agents/{uuid}/publish/",
    "/api/provider-agents/{uuid}/unpublish/",
    "/api/agent-api-keys/{uuid}/revoke/",
    "/api/invitations/{uuid}/accept/",
    "/api/invitations/{uuid}/decline/",
];

/// `fixed` and the schemas the request bodies referred to.
fn schemas(mut generator: schemars::SchemaGenerator, fixed: Value) -> Value {
    let mut all = match fixed {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    for (name, schema) in generator.take_definitions(true) {
        all.entry(name).or_insert(schema);
    }
    Value::Object(all)
}

fn operation_id(method: &str, path: &str) -> String {
    let mut id = method.to_owned();
    for seg in path.trim_start_matches("/api/").split('/') {
        let seg = seg.trim_start_matches('{').trim_end_matches('}');
        if !seg.is_empty() {
            id.push('_');
            id.push_str(&seg.replace(['-', '.'], "_"));
        }
    }
    id
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_route_is_documented_once() {
        let doc = super::build();
        let mut n = 0;
        for route in crate::ROUTES {
            assert!(
                doc["paths"][route.path][route.method].is_object(),
                "{route:?}"
            );
            n += 1;
        }
        let documented: usize = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|p| p.as_object().unwrap().len())
            .sum();
        assert_eq!(documented, n);
        let mut ids: Vec<String> = crate::ROUTES
            .iter()
            .map(|r| super::operation_id(r.method, r.path))
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "operation ids must be unique");
    }

    #[test]
    fn bodies_and_typed_answers_have_schemas_from_their_types() {
        let doc = super::build();
        let schema = |path: &str, method: &str, part: &str| {
            doc["paths"][path][method]
                .pointer(part)
                .cloned()
                .unwrap_or_default()
        };
        let body = schema(
            "/api/projects/",
            "post",
            "/requestBody/content/application~1json/schema",
        );
        assert_eq!(body["$ref"], "#/components/schemas/NewProject");
        let org = &doc["components"]["schemas"]["OrgAnswer"];
        assert_eq!(org["properties"]["approved"]["type"], "boolean", "{org}");
        assert!(org["required"].as_array().unwrap().contains(&"uuid".into()));
        let list = schema(
            "/api/organizations/",
            "get",
            "/responses/2XX/content/application~1json/schema",
        );
        assert_eq!(
            list["$ref"], "#/components/schemas/PageOfOrgAnswer",
            "{list}"
        );
        let offering = &doc["components"]["schemas"]["OfferingAnswer"];
        assert_eq!(
            offering["properties"]["plans"]["items"]["$ref"], "#/components/schemas/PlanAnswer",
            "{offering}"
        );
        let usage = &doc["components"]["schemas"]["ConfigUsage"];
        assert!(
            usage["required"]
                .as_array()
                .unwrap()
                .contains(&"series".into()),
            "{usage}"
        );
    }

    #[test]
    fn every_answer_with_a_body_has_a_schema() {
        let doc = super::build();
        for route in crate::ROUTES {
            let success = &doc["paths"][route.path][route.method]["responses"]["2XX"];
            match route.answer {
                Some(_) => assert!(
                    success["content"]["application/json"]["schema"].is_object(),
                    "{route:?}: {success}"
                ),
                None => assert!(success.get("content").is_none(), "{route:?}: {success}"),
            }
        }
    }
}
