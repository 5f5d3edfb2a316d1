//! The committed CRD YAML in crds/ (and the chart's CRD templates) must be exactly what `lockstep crds` writes.

use std::{collections::BTreeSet, fs, path::Path};

#[test]
fn committed_crds_match_generated() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let mut expected = BTreeSet::new();
    for crd in lockstep::crd::crdgen::all() {
        let name = lockstep::crd::crdgen::file_name(&crd);
        let generated = lockstep::crd::crdgen::render(&crd).unwrap();
        let committed = fs::read_to_string(dir.join(&name))
            .unwrap_or_else(|e| panic!("crds/{name} is missing ({e}); run `cargo run -- crds --out crds/`"));
        assert!(
            committed == generated,
            "crds/{name} differs from the Rust types; run `cargo run -- crds --out crds/` and commit the result"
        );
        expected.insert(name);
    }
    let present: BTreeSet<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(present, expected, "crds/ holds files that `lockstep crds` does not generate");
}

#[test]
fn crds_carry_printer_columns_short_names_and_category() {
    for crd in lockstep::crd::crdgen::all() {
        let names = &crd.spec.names;
        assert!(
            names.short_names.as_ref().is_some_and(|s| !s.is_empty()),
            "{} has no short name",
            names.kind
        );
        assert_eq!(names.categories.as_deref(), Some(&["lockstep".to_string()][..]));
        let cols = crd.spec.versions[0].additional_printer_columns.as_ref().expect("printer columns");
        assert!(cols.iter().any(|c| c.name == "Ready"), "{} has no Ready column", names.kind);
        assert!(
            crd.spec.versions[0].subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(),
            "{} has no status subresource",
            names.kind
        );
    }
}

/// The chart's CRD templates must be exactly what `lockstep crds --helm` writes.
#[test]
fn chart_crd_templates_match_generated() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(lockstep::crd::crdgen::HELM_DIR);
    let fix = "run `cargo run -- crds --helm charts/lockstep/templates/crds` and commit the result";
    let mut expected = BTreeSet::new();
    for crd in lockstep::crd::crdgen::all() {
        let name = lockstep::crd::crdgen::file_name(&crd);
        let generated = lockstep::crd::crdgen::render_helm(&crd).unwrap();
        let committed = fs::read_to_string(dir.join(&name)).unwrap_or_else(|e| panic!("{}/{name} is missing ({e}); {fix}", dir.display()));
        assert!(
            committed == generated,
            "{}/{name} differs from the Rust types; {fix}",
            dir.display()
        );
        expected.insert(name);
    }
    let present: BTreeSet<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        present,
        expected,
        "{} holds files that `lockstep crds --helm` does not generate",
        dir.display()
    );
}

/// Issue 12 item 9: a 1.25+ API server prices every CEL rule by the largest input it could see and
/// refuses the CRD when a list, map or string under the rule is unbounded. Every list and map in a
/// spec, and every string inside an object that carries a rule, must have a bound.
#[test]
fn everything_a_cel_rule_can_reach_is_bounded() {
    fn walk(path: &str, s: &serde_json::Value, under_rule: bool, missing: &mut Vec<String>) {
        let under_rule = under_rule || s.get("x-kubernetes-validations").is_some();
        match s.get("type").and_then(|t| t.as_str()) {
            Some("array") => {
                if s.get("maxItems").is_none() {
                    missing.push(format!("{path}: array without maxItems"));
                }
                if let Some(items) = s.get("items") {
                    walk(&format!("{path}[]"), items, under_rule, missing);
                }
            }
            Some("object") => {
                if let Some(ap) = s.get("additionalProperties").filter(|a| a.is_object()) {
                    if s.get("maxProperties").is_none() {
                        missing.push(format!("{path}: map without maxProperties"));
                    }
                    walk(&format!("{path}{{}}"), ap, under_rule, missing);
                }
                for (k, v) in s.get("properties").and_then(|p| p.as_object()).into_iter().flatten() {
                    walk(&format!("{path}.{k}"), v, under_rule, missing);
                }
            }
            Some("string") if under_rule && s.get("maxLength").is_none() && s.get("enum").is_none() => {
                missing.push(format!("{path}: string without maxLength under a CEL rule"));
            }
            _ => {}
        }
    }
    let mut missing = Vec::new();
    for crd in lockstep::crd::crdgen::all() {
        let kind = crd.spec.names.kind.clone();
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
        assert!(spec.is_object(), "{kind} has a spec");
        // Kubernetes' own types (a LabelSelector, a container's resources) are read by no rule.
        let mut spec = spec.clone();
        spec["properties"].as_object_mut().unwrap().remove("namespaceSelector");
        if let Some(relay) = spec["properties"]["relay"]["properties"].as_object_mut() {
            relay.remove("resources");
        }
        walk(&format!("{kind}.spec"), &spec, false, &mut missing);
    }
    assert!(missing.is_empty(), "unbounded for CEL cost:\n{}", missing.join("\n"));
}
