//! Who asked for a refresh (`requestedBy`): the channel quotas and history are keyed on.

use crate::parse::string_enum;

string_enum! {
    /// Who asked for a refresh.
    pub enum RequestedBy as "requestedBy" {
        /// Upstream app services, normal use (also the initial connection load).
        App => "APP",
        /// A tenant's on-demand API call.
        Api => "API",
        /// The dashboard.
        Portal => "PORTAL",
        /// Platform operators (a token with `api:admin`).
        Admin => "ADMIN",
        /// The auto-sync scheduler.
        Autosync => "AUTOSYNC",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(value: RequestedBy, text: &str) {
        assert_eq!(value.as_str(), text);
        assert_eq!(value.to_string(), text);
        assert_eq!(text.parse::<RequestedBy>().unwrap(), value);
        assert_eq!(
            serde_json::to_string(&value).unwrap(),
            format!("\"{text}\"")
        );
        assert_eq!(
            serde_json::from_str::<RequestedBy>(&format!("\"{text}\"")).unwrap(),
            value
        );
    }

    #[test]
    fn spellings() {
        check(RequestedBy::App, "APP");
        check(RequestedBy::Api, "API");
        check(RequestedBy::Portal, "PORTAL");
        check(RequestedBy::Admin, "ADMIN");
        check(RequestedBy::Autosync, "AUTOSYNC");
        assert_eq!(RequestedBy::ALL.len(), 5);
    }

    #[test]
    fn rejects_other_spellings() {
        let check = |input: &str| {
            let err = input.parse::<RequestedBy>().unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "unknown requestedBy {input:?}, expected one of APP, API, PORTAL, ADMIN, AUTOSYNC"
                )
            );
            assert!(serde_json::from_str::<RequestedBy>(&format!("{input:?}")).is_err());
        };
        check("");
        check("app");
        check("Api");
        check(" APP");
        check("SCHEDULER");
    }
}
