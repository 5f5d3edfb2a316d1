//! The docs stay true where a test can tell: every condition reason and every alert has its
//! troubleshooting entry (the alerts' runbook_url points at it), the README lists exactly the
//! subcommands the binary has, every metric name the docs quote is one the code defines, and every
//! relative link leads to a file (and a heading, for links into Markdown).

use lockstep::operator::conditions::Reason;
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let p = root().join(rel);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

/// README.md and every Markdown file in docs/, as (path relative to the root, text).
fn doc_files() -> Vec<(String, String)> {
    let mut files = vec![("README.md".to_owned(), read("README.md"))];
    let mut names: Vec<String> = fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md"))
        .collect();
    names.sort();
    for n in names {
        let rel = format!("docs/{n}");
        let text = read(&rel);
        files.push((rel, text));
    }
    files
}

/// The text outside fenced code blocks, line by line.
fn prose(text: &str) -> Vec<&str> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            out.push(line);
        }
    }
    out
}

/// The first string literal on `line`, if any.
fn literal(line: &str) -> Option<&str> {
    let start = line.find('"')? + 1;
    let len = line[start..].find('"')?;
    Some(&line[start..start + len])
}

/// Every condition reason the operator writes.
fn reasons() -> Vec<String> {
    let found: Vec<String> = Reason::ALL.iter().map(|r| r.as_str().to_owned()).collect();
    assert!(found.len() > 30, "only {} reasons: {found:?}", found.len());
    found
}

/// The alert names of the chart's PrometheusRule.
fn alerts() -> Vec<String> {
    let found: Vec<String> = read("charts/lockstep/templates/prometheusrule.yaml")
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- alert:"))
        .map(|a| a.trim().to_owned())
        .collect();
    assert!(
        found.len() >= 7,
        "read only {} alerts from the PrometheusRule: {found:?}",
        found.len()
    );
    found
}

/// The `### Name` headings of a page.
fn entries(text: &str) -> BTreeSet<String> {
    prose(text)
        .iter()
        .filter_map(|l| l.strip_prefix("### "))
        .map(|h| h.trim().to_owned())
        .collect()
}

#[test]
fn every_reason_and_alert_has_a_troubleshooting_entry() {
    let have = entries(&read("docs/troubleshooting.md"));
    let missing: Vec<String> = reasons()
        .into_iter()
        .map(|r| format!("reason {r}"))
        .chain(alerts().into_iter().map(|a| format!("alert {a}")))
        .filter(|what| !have.contains(what.split(' ').nth(1).unwrap_or_default()))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/troubleshooting.md has no `### <Name>` entry for: {}",
        missing.join(", ")
    );
}

/// The subcommands `lockstep --help` lists (clap's "Commands:" section, without `help`).
fn binary_subcommands() -> BTreeSet<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .arg("--help")
        .output()
        .expect("run lockstep --help");
    assert!(
        out.status.success(),
        "lockstep --help failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8 help");
    let section = text.split("Commands:").nth(1).expect("lockstep --help has a Commands: section");
    section
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        // A name is indented by two spaces; a wrapped description further.
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

/// The subcommands the README's `## Commands` code block lists (`lockstep <name> ...` lines).
fn readme_subcommands() -> BTreeSet<String> {
    let readme = read("README.md");
    let section = readme
        .split("\n## Commands\n")
        .nth(1)
        .expect("README.md has a `## Commands` section");
    let block = section.split("```").nth(1).expect("the Commands section has a code block");
    block
        .lines()
        .filter_map(|l| l.strip_prefix("lockstep "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_readme_lists_every_subcommand() {
    let binary = binary_subcommands();
    let readme = readme_subcommands();
    let unlisted: Vec<&String> = binary.difference(&readme).collect();
    let unknown: Vec<&String> = readme.difference(&binary).collect();
    assert!(
        unlisted.is_empty() && unknown.is_empty(),
        "README.md `## Commands` lacks {unlisted:?} (printed by `lockstep --help`) and lists {unknown:?} \
         (which `lockstep --help` does not print)"
    );
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).expect("a readable directory").flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every string literal of `text` that is a plain lowercase identifier.
fn identifiers(text: &str) -> Vec<&str> {
    let ident = |s: &&str| !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    text.split('"').skip(1).step_by(2).filter(ident).collect()
}

/// (metric names the code registers, other `lockstep_*` identifiers it uses: tables). A metric is
/// a registered name with its registry's prefix (`Registry::with_prefix("lockstep_relay")` and
/// `"published"`), or a full `lockstep_*` name in a file that registers metrics.
fn names_in_src() -> (BTreeSet<String>, BTreeSet<String>) {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let (mut metrics, mut others) = (BTreeSet::new(), BTreeSet::new());
    for f in files {
        let text = fs::read_to_string(&f).expect("readable source");
        let full = identifiers(&text).into_iter().filter(|s| s.starts_with("lockstep_"));
        if !text.contains("register(") {
            others.extend(full.map(str::to_owned));
            continue;
        }
        metrics.extend(full.map(str::to_owned));
        let prefixes: Vec<&str> = text.split("with_prefix(").skip(1).filter_map(literal).collect();
        for name in identifiers(&text) {
            metrics.extend(prefixes.iter().map(|p| format!("{p}_{name}")));
        }
    }
    (metrics, others)
}

/// The `lockstep_...` names a page mentions.
fn quoted_names(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, _) in text.match_indices("lockstep_") {
        if text[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &text[i..];
        let end = rest
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(rest.len());
        found.insert(rest[..end].trim_end_matches('_').to_owned());
    }
    found
}

#[test]
fn every_quoted_metric_name_is_defined() {
    let (metrics, others) = names_in_src();
    assert!(
        metrics.contains("lockstep_relay_active"),
        "no relay metric found in src/: {metrics:?}"
    );
    // What Prometheus adds to a registered name: counters' _total, histograms' series.
    let defined = |n: &str| {
        metrics.contains(n)
            || ["_total", "_bucket", "_sum", "_count", "_created"]
                .iter()
                .any(|s| n.strip_suffix(s).is_some_and(|base| metrics.contains(base)))
    };
    let mut unknown: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (file, text) in doc_files() {
        for name in quoted_names(&text) {
            if !defined(&name) && !others.contains(&name) {
                unknown.entry(name).or_default().push(file.clone());
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "metric names quoted in the docs that no metric in src/ defines: {unknown:?}"
    );
}

/// GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a Markdown file's headings (a repeated one gets -1, -2, ... as on GitHub).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for line in prose(text) {
        let Some(h) = line.strip_prefix('#').map(|h| h.trim_start_matches('#')) else {
            continue;
        };
        let a = anchor(h);
        let n = seen.entry(a.clone()).or_insert(0);
        out.insert(if *n == 0 { a.clone() } else { format!("{a}-{n}") });
        *n += 1;
    }
    out
}

/// The targets of the Markdown links `[text](target)` outside code blocks.
fn link_targets(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in prose(text) {
        for part in line.split("](").skip(1) {
            if let Some(end) = part.find(')') {
                out.push(part[..end].trim().to_owned());
            }
        }
    }
    out
}

/// Why a link from `file` does not lead anywhere, if it does not.
fn broken(file: &str, text: &str, target: &str) -> Option<String> {
    if target.contains("://") || target.starts_with("mailto:") {
        return None;
    }
    let (path, fragment) = target.split_once('#').map_or((target, None), |(p, f)| (p, Some(f)));
    let (resolved, content) = if path.is_empty() {
        (file.to_owned(), text.to_owned())
    } else {
        let dir = Path::new(file).parent().unwrap_or(Path::new(""));
        let p = root().join(dir).join(path);
        if !p.exists() {
            return Some(format!("{file}: link to {target}: {} does not exist", p.display()));
        }
        (p.display().to_string(), fs::read_to_string(&p).unwrap_or_default())
    };
    match fragment {
        Some(f) if resolved.ends_with(".md") && !anchors(&content).contains(f) => {
            Some(format!("{file}: link to {target}: no heading with anchor #{f}"))
        }
        _ => None,
    }
}

#[test]
fn every_relative_link_leads_somewhere() {
    let mut problems = Vec::new();
    for (file, text) in doc_files() {
        for target in link_targets(&text) {
            problems.extend(broken(&file, &text, &target));
        }
    }
    assert!(problems.is_empty(), "broken links:\n{}", problems.join("\n"));
}

#[test]
fn the_platform_pages_exist() {
    for page in ["install", "prerequisites", "secrets", "upgrade", "uninstall", "troubleshooting"] {
        let p = root().join(format!("docs/{page}.md"));
        assert!(p.is_file(), "{} is missing", p.display());
        assert!(
            read("README.md").contains(&format!("(docs/{page}.md)")),
            "README.md does not link docs/{page}.md"
        );
    }
}

#[test]
fn anchors_are_githubs() {
    assert_eq!(anchor("Kafka settings (`authSecretRef`)"), "kafka-settings-authsecretref");
    assert_eq!(anchor("Check it with `lockstep doctor`"), "check-it-with-lockstep-doctor");
    assert_eq!(anchor("LockstepOperatorDown"), "lockstepoperatordown");
    let a = anchors("# A\n## B\n```\n# not a heading\n```\n### B\n");
    assert_eq!(a, ["a", "b", "b-1"].iter().map(|s| s.to_string()).collect());
}
