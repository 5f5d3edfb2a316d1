//! Which librdkafka settings lockstep never hands to librdkafka, or not in the operator, and how
//! their values are taken out of error text. Pure: the spec validation, the doctor and the Kafka
//! clients share it.

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

/// What a setting's value becomes in an error message.
pub const REDACTED: &str = "<redacted>";

/// A tail of the text this long that starts a value counts as that value cut short.
const MIN_CUT_VALUE: usize = 4;

/// `text` with every occurrence of each non-empty value replaced by [`REDACTED`], overlapping
/// occurrences merged. librdkafka writes its messages into a 512-byte buffer, so a long value may
/// be cut short at the end of the text: a tail that starts a value (at least [`MIN_CUT_VALUE`]
/// bytes of it) is taken out too.
pub fn scrub<'a>(text: &str, values: impl IntoIterator<Item = &'a str>) -> String {
    let mut hidden = vec![false; text.len()];
    for v in values.into_iter().filter(|v| !v.is_empty()) {
        for (at, m) in text.match_indices(v) {
            hidden[at..at + m.len()].fill(true);
        }
        let cut = (MIN_CUT_VALUE.min(v.len())..v.len())
            .rev()
            .find(|&n| v.is_char_boundary(n) && text.ends_with(&v[..n]));
        if let Some(n) = cut {
            hidden[text.len() - n..].fill(true);
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut in_hidden = false;
    for (i, c) in text.char_indices() {
        match (hidden[i], in_hidden) {
            (true, false) => out.push_str(REDACTED),
            (false, _) => out.push(c),
            (true, true) => {}
        }
        in_hidden = hidden[i];
    }
    out
}
