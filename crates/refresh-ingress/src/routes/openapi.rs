//! The OpenAPI 3 document of the HTTP API, generated from the route annotations and
//! the wire types (`GET /openapi.json`).

use refresh_core::{Problem, RefreshError, RefreshRecord, RefreshSummary};
use serde_json::{Value, json};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::error::PROBLEM_JSON;

use super::{compat, consents, data, events, operations, refreshes, settings, views};

#[derive(OpenApi)]
#[openapi(
    info(title = "refreshd", description = "Keeps the stored bank data of open-banking consents fresh."),
    paths(
        consents::register_consent,
        consents::list_consents,
        events::events,
        consents::get_consent,
        consents::revoke,
        refreshes::history,
        refreshes::get_refresh,
        refreshes::request_refresh,
        compat::sync_refresh,
        compat::async_refresh,
        settings::get_settings,
        settings::put_settings,
        operations::healthz,
        operations::readyz,
        operations::metrics,
        data::accounts,
        data::balances,
        data::transactions,
        data::changes,
        data::parties,
        data::beneficiaries,
        data::direct_debits,
        data::standing_orders,
        data::scheduled_payments,
        data::statements,
        data::products,
    ),
    components(schemas(
        Problem,
        RefreshRecord,
        RefreshError,
        RefreshSummary,
        views::ConsentView,
        views::QuotaView,
        consents::RegisterConsent,
        consents::ConsentPage,
        settings::AppSettings,
        settings::SettingsView,
        compat::CompatMessage,
        refreshes::History,
        data::TransactionItem,
        data::TransactionPage,
        data::ChangeSet,
        data::StoredList,
        data::StoredItems,
    )),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let mut bearer = Http::new(HttpAuthScheme::Bearer);
        bearer.bearer_format = Some("JWT".to_owned());
        bearer.description = Some(
            "HS256 or RS256 JWT; `scope` contains `api:stored_data` (or `api:admin`), `tenant_id` names the tenant"
                .to_owned(),
        );
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(bearer));
    }
}

/// The document as JSON.
pub(crate) fn document() -> String {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    complete(&mut doc);
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// What every operation can answer besides what its annotation lists, added in one
/// place so that no operation forgets one (a generator trusts the document): the
/// auth problems on every secured operation, 400 wherever an id, a query or a body
/// can be malformed, 404 wherever a path names a resource, 413 with a body, 503 on
/// every call that reaches a dependency; the id formats; and the headers that go with
/// 202, 429 and 503.
fn complete(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for operation in item.values_mut() {
            complete_operation(path, operation);
        }
    }
}

fn problem(description: &str) -> Value {
    json!({
        "description": description,
        "content": { PROBLEM_JSON: { "schema": { "$ref": "#/components/schemas/Problem" } } }
    })
}

fn complete_operation(path: &str, operation: &mut Value) {
    let secured = operation.get("security").is_some();
    let has_body = operation.get("requestBody").is_some();
    let mut has_query = false;
    let mut names_resource = false;
    if let Some(params) = operation
        .get_mut("parameters")
        .and_then(Value::as_array_mut)
    {
        for param in params {
            let name = param["name"].as_str().unwrap_or_default().to_owned();
            let place = param["in"].as_str().unwrap_or_default().to_owned();
            has_query |= place == "query";
            if place == "path" {
                names_resource = true;
            }
            match name.as_str() {
                "consentId" | "refreshId" | "Last-Event-ID" => {
                    param["schema"] = json!({ "type": "string", "format": "uuid" });
                }
                "tenantId" => {
                    param["schema"] = json!({ "type": "string", "pattern": TENANT_PATTERN });
                }
                _ => {}
            }
        }
    }
    let Some(responses) = operation
        .get_mut("responses")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    let mut add = |status: &str, description: &str| {
        responses
            .entry(status)
            .or_insert_with(|| problem(description));
    };
    let operations_route = matches!(path, "/healthz" | "/metrics" | "/readyz");
    if secured {
        add("401", "Missing, invalid or expired token (`unauthorized`)");
        add(
            "403",
            "The token's scope does not allow this (`insufficient_scope`)",
        );
    }
    if names_resource || has_query || has_body {
        add("400", "A malformed id, parameter or body (`bad_request`)");
    }
    if names_resource {
        add(
            "404",
            "Unknown, or another tenant's (`consent_not_found` / `not_found`)",
        );
    }
    if has_body {
        add("413", "The body exceeds 64 KiB (`payload_too_large`)");
    }
    if !operations_route {
        add(
            "503",
            "Redis, RabbitMQ or PostgreSQL is unreachable (`unavailable`)",
        );
    }
    for (status, response) in responses.iter_mut() {
        let headers = response
            .as_object_mut()
            .map(|r| r.entry("headers").or_insert_with(|| json!({})));
        let Some(headers) = headers.and_then(Value::as_object_mut) else {
            continue;
        };
        match status.as_str() {
            "429" | "503" => {
                headers.entry("Retry-After").or_insert_with(|| {
                    json!({ "description": "Seconds to wait before asking again", "schema": { "type": "integer", "minimum": 0 } })
                });
            }
            "202" if path.ends_with("/refresh") => {
                headers.entry("Location").or_insert_with(|| {
                    json!({ "description": "`/v1/refreshes/{refreshId}`: the refresh record", "schema": { "type": "string" } })
                });
            }
            _ => {}
        }
        if headers.is_empty()
            && let Some(r) = response.as_object_mut()
        {
            r.remove("headers");
        }
    }
}

/// `TenantId`'s rule (refresh-core): 1 to 64 of letters, digits, `.`, `_`, `-`.
const TENANT_PATTERN: &str = "^[A-Za-z0-9._-]{1,64}$";

#[cfg(test)]
mod tests {
    /// Every route the API router serves, read from its source: (path, method).
    fn routed() -> Vec<(String, String)> {
        let source = include_str!("mod.rs");
        let body =
            &source[source.find("Router::new()").unwrap()..source.find(".fallback(").unwrap()];
        let mut routes = Vec::new();
        for call in body.split(".route(").skip(1) {
            let path = call.split('"').nth(1).unwrap();
            // `{consent_id}` in axum is `{consentId}` in the document.
            let path = path
                .replace("{consent_id}", "{consentId}")
                .replace("{refresh_id}", "{refreshId}")
                .replace("{tenant_id}", "{tenantId}");
            for method in ["get", "post", "put", "delete", "patch"] {
                let rest = &call[call.find(',').unwrap()..];
                if rest.contains(&format!("{method}(")) {
                    routes.push((path.clone(), method.to_owned()));
                }
            }
        }
        routes
    }

    #[test]
    fn every_routed_operation_is_in_the_document_with_its_statuses() {
        let doc: serde_json::Value = serde_json::from_str(&super::document()).unwrap();
        let routes = routed();
        assert!(routes.len() > 25, "{routes:?}");
        for (path, method) in &routes {
            if path == "/openapi.json" {
                continue;
            }
            let operation = &doc["paths"][path.as_str()][method.as_str()];
            assert!(operation.is_object(), "{method} {path} is not documented");
            let responses = &operation["responses"];
            let secured = operation.get("security").is_some();
            let mut expected = vec![];
            if secured {
                expected.extend(["401", "403", "503"]);
            }
            if path.contains('{') {
                expected.extend(["400", "404"]);
            }
            if operation.get("requestBody").is_some() {
                expected.extend(["400", "413"]);
            }
            for status in expected {
                let response = &responses[status];
                assert!(response.is_object(), "{method} {path}: {status}");
                if status != "200" {
                    assert_eq!(
                        response["content"]["application/problem+json"]["schema"]["$ref"],
                        "#/components/schemas/Problem",
                        "{method} {path}: {status}"
                    );
                }
            }
            for (status, response) in responses.as_object().unwrap() {
                if status == "429" || status == "503" {
                    assert!(
                        response["headers"]["Retry-After"].is_object(),
                        "{method} {path}: {status}"
                    );
                }
            }
            for param in operation["parameters"].as_array().into_iter().flatten() {
                if matches!(param["name"].as_str(), Some("consentId" | "refreshId")) {
                    assert_eq!(param["schema"]["format"], "uuid", "{method} {path}");
                }
            }
        }
        for (path, method) in [
            ("/v1/consents", "post"),
            ("/v1/apps/{tenantId}/settings", "put"),
        ] {
            assert!(
                doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
                    .is_object(),
                "{method} {path} has a request body"
            );
        }
        assert!(
            doc["paths"]["/v1/consents/{consentId}/refresh"]["post"]["responses"]["202"]["headers"]
                ["Location"]
                .is_object()
        );
        // A PUT without the interval is a 400 (null is allowed, absence is not).
        let required = &doc["components"]["schemas"]["AppSettings"]["required"];
        assert_eq!(
            required,
            &serde_json::json!(["autosyncIntervalHours", "inactivationDays"])
        );
    }

    #[test]
    fn the_document_lists_every_route_and_schema() {
        let doc: serde_json::Value = serde_json::from_str(&super::document()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        for path in [
            "/v1/consents",
            "/v1/consents/{consentId}",
            "/v1/consents/{consentId}/refresh",
            "/v1/consents/{consentId}/refreshes",
            "/v1/consents/{consentId}/revoke",
            "/v1/refreshes/{refreshId}",
            "/v1/refreshes/{refreshId}/changes",
            "/v1/apps/{tenantId}/settings",
            "/stored-data/v1/consents/{consentId}/refresh",
            "/cfa/consent/{consentId}/refresh",
            "/healthz",
            "/readyz",
            "/metrics",
            "/v1/consents/{consentId}/accounts",
            "/v1/consents/{consentId}/balances",
            "/v1/consents/{consentId}/transactions",
            "/v1/consents/{consentId}/parties",
            "/v1/consents/{consentId}/beneficiaries",
            "/v1/consents/{consentId}/direct-debits",
            "/v1/consents/{consentId}/standing-orders",
            "/v1/consents/{consentId}/scheduled-payments",
            "/v1/consents/{consentId}/statements",
            "/v1/consents/{consentId}/products",
        ] {
            assert!(doc["paths"][path].is_object(), "{path}");
        }
        let record = &doc["components"]["schemas"]["RefreshRecord"]["properties"];
        for field in [
            "refreshId",
            "consentId",
            "tenantId",
            "requestedBy",
            "status",
            "dateRequested",
            "notBefore",
            "summary",
            "error",
        ] {
            assert!(record[field].is_object(), "{field}");
        }
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
        let tx = &doc["components"]["schemas"]["TransactionItem"]["properties"];
        for field in [
            "accountId",
            "transactionId",
            "bookingDate",
            "bookingDateTime",
            "status",
            "amount",
            "currency",
            "creditDebitIndicator",
            "description",
        ] {
            assert!(tx[field].is_object(), "{field}");
        }
        let params = doc["paths"]["/v1/consents/{consentId}/transactions"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect::<Vec<_>>();
        assert_eq!(
            params,
            ["consentId", "accountId", "from", "to", "cursor", "limit"]
        );
        let refresh = &doc["paths"]["/v1/consents/{consentId}/refresh"]["post"]["responses"];
        for status in ["202", "200", "401", "403", "404", "409", "429", "503"] {
            assert!(refresh[status].is_object(), "{status}");
        }
    }
}
