//! Which librdkafka settings lockstep never hands to librdkafka, or not in the operator.

use std::collections::BTreeMap;

use super::AdminError;

/// librdkafka settings that load code or run a command (a plugin library, an OpenSSL engine or
/// provider, the Kerberos kinit command). Refused in a spec, in `lockstep relay`'s settings and in
/// any Secret the operator builds a client from; `Admin::new` refuses them too.
pub const CODE_LOADING_SETTINGS: [&str; 6] = [
    "plugin.library.paths",
    "interceptors",
    "ssl.engine.location",
    "ssl.engine.id",
    "ssl.providers",
    "sasl.kerberos.kinit.cmd",
];

/// Why the operator will not build a Kafka client with `key` (from a user's Secret), if it will
/// not: the key loads code or runs a command, or names a file, which in the operator is a file of
/// the operator's own (its service-account token, say), never the user's. TLS material goes in
/// inline (`ssl.ca.pem`, `ssl.certificate.pem`, `ssl.key.pem`); `ssl.ca.location=probe` (the
/// system's CA bundle) is allowed. Pure.
pub fn operator_refuses(key: &str, value: &str) -> Option<&'static str> {
    let k = key.trim().to_ascii_lowercase();
    if CODE_LOADING_SETTINGS.contains(&k.as_str()) {
        return Some("loads code or runs a command in the operator");
    }
    let file = [".location", ".file", ".keytab"].iter().any(|s| k.ends_with(s)) || k == "ssl.ca.certificate.stores";
    if file && !(k == "ssl.ca.location" && value.trim() == "probe") {
        return Some("reads a file of the operator's own filesystem; put the PEM itself in the Secret (ssl.ca.pem, ssl.certificate.pem, ssl.key.pem)");
    }
    None
}

/// Err when `settings` hold a key of [`CODE_LOADING_SETTINGS`]: `Admin::new` never loads one.
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
