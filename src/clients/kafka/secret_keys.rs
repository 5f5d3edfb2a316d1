//! The admin client's refusal of code-loading settings; the lists themselves are in
//! `core::kafka_settings`.

use std::collections::BTreeMap;

use super::AdminError;
use crate::core::kafka_settings::CODE_LOADING_SETTINGS;

/// Err when `settings` hold a key of `CODE_LOADING_SETTINGS`: `Admin::new` never loads one.
pub(super) fn refuse_code_loading(settings: &BTreeMap<String, String>) -> Result<(), AdminError> {
    match settings
        .keys()
        .find(|k| CODE_LOADING_SETTINGS.contains(&k.trim().to_ascii_lowercase().as_str()))
    {
        Some(k) => Err(AdminError::Config(format!("{k}: loads code or runs a command; refused"))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_client_refuses_code_loading_keys_by_name() {
        let s = |k: &str| BTreeMap::from([(k.to_string(), "/tmp/S3CRET.so".to_string())]);
        assert!(refuse_code_loading(&s("sasl.password")).is_ok());
        assert!(
            refuse_code_loading(&s("ssl.ca.location")).is_ok(),
            "the relay and the CLI may read files"
        );
        let e = refuse_code_loading(&s(" Plugin.Library.Paths")).unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid Kafka client settings:  Plugin.Library.Paths: loads code or runs a command; refused"
        );
    }
}
