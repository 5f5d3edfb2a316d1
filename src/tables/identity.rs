//! How a relay names its database sessions, so that `pg_stat_activity` and the operator's
//! `status.relays` say which pod a session is: `lockstep-relay/<host name>`, the host name being
//! the pod's name in Kubernetes. PostgreSQL cuts an application_name at 63 bytes; a host name too
//! long for that is left out rather than cut, so a name shown is always whole.

/// The application_name of relay sessions without a host name.
pub const APPLICATION_NAME: &str = "lockstep-relay";

/// PostgreSQL keeps NAMEDATALEN - 1 bytes of an application_name.
const MAX_LEN: usize = 63;

/// The application_name for a relay on `host`. Pure.
pub fn application_name(host: Option<&str>) -> String {
    match host.filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic())) {
        Some(h) if APPLICATION_NAME.len() + 1 + h.len() <= MAX_LEN => format!("{APPLICATION_NAME}/{h}"),
        _ => APPLICATION_NAME.to_owned(),
    }
}

/// The host (pod) a relay session's application_name names. Pure.
pub fn host_of(application_name: &str) -> Option<&str> {
    application_name
        .strip_prefix(APPLICATION_NAME)?
        .strip_prefix('/')
        .filter(|h| !h.is_empty())
}

/// This machine's host name: the pod's name in Kubernetes.
pub fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0)?;
    String::from_utf8(buf[..end].to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_is_named_when_it_fits_whole() {
        let pod = "orders-relay-6d8f9c7b5-x2x4q";
        assert_eq!(application_name(Some(pod)), format!("lockstep-relay/{pod}"));
        assert_eq!(host_of(&application_name(Some(pod))), Some(pod));
        // 15 + 48 = 63 bytes fits; one more would be cut by PostgreSQL, so it is left out.
        let fits = "a".repeat(48);
        assert_eq!(application_name(Some(&fits)).len(), 63);
        assert_eq!(application_name(Some(&"a".repeat(49))), "lockstep-relay");
        assert_eq!(application_name(None), "lockstep-relay");
        assert_eq!(application_name(Some("")), "lockstep-relay");
        assert_eq!(application_name(Some("bad name")), "lockstep-relay");
        assert_eq!(host_of("lockstep-relay"), None);
        assert_eq!(host_of("lockstep-relayx/y"), None);
        assert_eq!(host_of("psql"), None);
    }

    #[test]
    fn this_machine_has_a_host_name() {
        assert!(host_name().is_some_and(|h| !h.is_empty()));
    }
}
