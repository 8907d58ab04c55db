//! The OpenAPI 3 document of the HTTP API, generated from the route annotations and
//! the wire types (`GET /openapi.json`).

use refresh_core::{Problem, RefreshError, RefreshRecord, RefreshSummary};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::{data, routes};

#[derive(OpenApi)]
#[openapi(
    info(title = "refreshd", description = "Keeps the stored bank data of open-banking consents fresh."),
    paths(
        routes::register_consent,
        routes::get_consent,
        routes::revoke,
        routes::history,
        routes::get_refresh,
        routes::request_refresh,
        routes::sync_refresh,
        routes::async_refresh,
        routes::get_settings,
        routes::put_settings,
        routes::healthz,
        routes::readyz,
        routes::metrics,
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
        routes::ConsentView,
        routes::QuotaView,
        routes::RegisterConsent,
        routes::AppSettings,
        routes::SettingsView,
        routes::CompatMessage,
        routes::History,
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
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}

#[cfg(test)]
mod tests {
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
