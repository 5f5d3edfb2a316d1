//! The committed CRD YAML in crds/ (and the chart's CRD templates) must be exactly what `lockstep crds` writes.

use std::{collections::BTreeSet, fs, path::Path};

#[test]
fn committed_crds_match_generated() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let mut expected = BTreeSet::new();
    for crd in lockstep::crdgen::all() {
        let name = lockstep::crdgen::file_name(&crd);
        let generated = lockstep::crdgen::render(&crd).unwrap();
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
    for crd in lockstep::crdgen::all() {
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
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(lockstep::crdgen::HELM_DIR);
    let fix = "run `cargo run -- crds --helm charts/lockstep/templates/crds` and commit the result";
    let mut expected = BTreeSet::new();
    for crd in lockstep::crdgen::all() {
        let name = lockstep::crdgen::file_name(&crd);
        let generated = lockstep::crdgen::render_helm(&crd).unwrap();
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
