//! Which images relay Deployments may run. A relay pod mounts its namespace's database and Kafka
//! Secrets, so an OutboxRelay naming any image would let whoever may create one run their own
//! code with those Secrets: `spec.relay.image` must be under one of the operator's
//! `--relay-image-prefixes` (by default the repository of its own `--relay-image`).

use crate::operator::conditions::{condition, Cond, Reason};

/// The repository of an image reference and what follows it (`:tag`, `@digest`, both, or
/// nothing). A registry's port (`host:5000/x`) is part of the repository. Pure.
pub fn split(image: &str) -> (&str, &str) {
    let end = image.find('@').unwrap_or(image.len());
    let name = &image[..end];
    let repo_end = match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => i,
        _ => end,
    };
    (&image[..repo_end], &image[repo_end..])
}

/// `:tag`, `@algorithm:hex` or `:tag@algorithm:hex`, in the characters the reference grammar allows.
fn tag_and_digest(rest: &str) -> bool {
    let (tag, digest) = match rest.split_once('@') {
        Some((t, d)) => (t, Some(d)),
        None => (rest, None),
    };
    let tag_ok = tag.is_empty()
        || tag.strip_prefix(':').is_some_and(|t| {
            (1..=128).contains(&t.len()) && t.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) && !t.starts_with(['.', '-'])
        });
    let digest_ok = digest.is_none_or(|d| {
        d.split_once(':').is_some_and(|(alg, hex)| {
            !alg.is_empty()
                && alg.chars().all(|c| c.is_ascii_alphanumeric() || "+._-".contains(c))
                && hex.len() >= 32
                && hex.chars().all(|c| c.is_ascii_hexdigit())
        })
    });
    tag_ok && digest_ok
}

/// `image` is allowed by `prefix`: the repository itself with any tag or digest, or, for a prefix
/// ending in '/', any repository under it. Textual: `lockstep` is not `lockstep-evil`. Pure.
pub fn allows(prefix: &str, image: &str) -> bool {
    let (repo, rest) = split(image);
    if !tag_and_digest(rest) {
        return false;
    }
    match prefix.strip_suffix('/') {
        Some(_) => repo.len() > prefix.len() && repo.starts_with(prefix) && !repo.contains("//"),
        None => repo == prefix,
    }
}

/// The prefixes in force: those given (trimmed, empty ones dropped), else the repository of the
/// operator's own relay image. Pure.
pub fn prefixes(default_image: &str, given: &[String]) -> Vec<String> {
    let given: Vec<String> = given.iter().map(|p| p.trim().to_owned()).filter(|p| !p.is_empty()).collect();
    if given.is_empty() {
        vec![split(default_image).0.to_owned()]
    } else {
        given
    }
}

/// Ready (InvalidSpec) when the spec names an image outside `prefixes`; the operator's own
/// `default_image` is always allowed (its administrator chose it). Pure.
pub fn refused(image: Option<&str>, default_image: &str, prefixes: &[String]) -> Option<Cond> {
    let image = image?;
    if image == default_image || prefixes.iter().any(|p| allows(p, image)) {
        return None;
    }
    Some(Cond::no(
        condition::READY,
        Reason::InvalidSpec,
        format!(
            "spec.relay.image: {image:?} is not an image this operator runs relays from (allowed: {}, \
             set by the operator's --relay-image-prefixes); omit it to use {default_image}",
            prefixes.join(", ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: &str = "ghcr.io/lockstep-dev/lockstep";

    #[test]
    fn the_repository_is_the_reference_without_tag_or_digest() {
        assert_eq!(split("ghcr.io/lockstep-dev/lockstep:1.2"), (OWN, ":1.2"));
        assert_eq!(split("localhost:5000/lockstep"), ("localhost:5000/lockstep", ""));
        assert_eq!(
            split("localhost:5000/lockstep:t@sha256:ab"),
            ("localhost:5000/lockstep", ":t@sha256:ab")
        );
        assert_eq!(split("lockstep:test"), ("lockstep", ":test"));
        assert_eq!(split("lockstep@sha256:00"), ("lockstep", "@sha256:00"));
    }

    #[test]
    fn a_repository_allows_its_tags_and_digests_and_nothing_beside_it() {
        let digest = format!("@sha256:{}", "a".repeat(64));
        for ok in [
            format!("{OWN}:1.2"),
            OWN.to_owned(),
            format!("{OWN}{digest}"),
            format!("{OWN}:1.2{digest}"),
        ] {
            assert!(allows(OWN, &ok), "{ok}");
        }
        for bad in [
            format!("{OWN}-evil:1.2"),
            format!("{OWN}/evil:1"),
            format!("{OWN}evil"),
            "ghcr.io/lockstep-dev/lockste:1".to_owned(),
            format!("evil.io/{OWN}:1"),
            format!("{OWN}:1.2@sha256:zz"),
            format!("{OWN}:-x"),
            format!("{OWN}@"),
        ] {
            assert!(!allows(OWN, &bad), "{bad}");
        }
    }

    #[test]
    fn a_prefix_ending_in_a_slash_allows_what_is_under_it() {
        let p = "registry.example/team/";
        assert!(allows(p, "registry.example/team/relay:2"));
        assert!(allows(p, "registry.example/team/sub/relay"));
        assert!(!allows(p, "registry.example/team-evil/relay:2"));
        assert!(!allows(p, "registry.example/team/"));
        assert!(!allows(p, "registry.example/team//x"));
        assert!(!allows(p, "registry.example/other/relay"));
    }

    #[test]
    fn the_default_is_the_operators_own_repository() {
        assert_eq!(prefixes(&format!("{OWN}:latest"), &[]), [OWN]);
        assert_eq!(prefixes("lockstep:test", &[" ".into()]), ["lockstep"]);
        let given = ["a.io/x".to_owned(), " b.io/ ".to_owned(), String::new()];
        assert_eq!(prefixes(&format!("{OWN}:latest"), &given), ["a.io/x", "b.io/"]);
    }

    #[test]
    fn an_image_outside_is_invalid_spec_naming_the_field() {
        let own = format!("{OWN}:latest");
        let p = prefixes(&own, &[]);
        assert_eq!(refused(None, &own, &p), None);
        assert_eq!(refused(Some(&format!("{OWN}:1.2")), &own, &p), None);
        let c = refused(Some("evil.io/miner:1"), &own, &p).unwrap();
        assert_eq!((c.type_, c.reason), (condition::READY, Reason::InvalidSpec));
        assert!(
            c.message.starts_with("spec.relay.image: \"evil.io/miner:1\" is not"),
            "{}",
            c.message
        );
        assert!(c.message.contains(&format!("allowed: {OWN}, ")), "{}", c.message);
        // The operator's own image is allowed even when the list does not cover it.
        assert_eq!(refused(Some(&own), &own, &["other.io/".into()]), None);
    }
}
