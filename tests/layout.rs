//! The code stays in rooms a reader can hold: no source file over 450 lines, no function over 80
//! (counted from its `fn` line to its closing brace, as rustfmt lays it out). And src/ is in
//! layers: a module imports only its own layer and lower ranks, never another layer of its rank.

use std::{fs, path::Path};

const MAX_FILE_LINES: usize = 450;
const MAX_FN_LINES: usize = 80;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// (name, first line, length) of every function whose body opens on its signature's last line.
fn functions(text: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let t = lines[i].trim_start();
        let is_fn = [
            "fn ",
            "pub fn ",
            "pub(crate) fn ",
            "async fn ",
            "pub async fn ",
            "pub(crate) async fn ",
            "const fn ",
            "pub const fn ",
            "unsafe fn ",
        ]
        .iter()
        .any(|p| t.starts_with(p));
        if !is_fn {
            i += 1;
            continue;
        }
        let indent = lines[i].len() - t.len();
        let name = t
            .split("fn ")
            .nth(1)
            .unwrap_or("")
            .split(['(', '<'])
            .next()
            .unwrap_or("")
            .to_owned();
        // The body ends at the first later line that is a lone `}` at the same indentation.
        let mut open = i;
        while open < lines.len() && !lines[open].trim_end().ends_with('{') && !lines[open].trim_end().ends_with(';') {
            open += 1;
        }
        if open >= lines.len() || lines[open].trim_end().ends_with(';') {
            i = open + 1; // a declaration without a body
            continue;
        }
        let closing = " ".repeat(indent) + "}";
        let one_line = lines[open].trim_end().ends_with("{}");
        let mut end = open;
        while !one_line && end < lines.len() && lines[end].trim_end() != closing {
            end += 1;
        }
        if end < lines.len() {
            found.push((name, i + 1, end - i + 1));
        }
        i += 1;
    }
    found
}

#[test]
fn files_and_functions_stay_small() {
    let mut files = Vec::new();
    rust_files(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src")), &mut files);
    let mut problems = Vec::new();
    for f in &files {
        let text = fs::read_to_string(f).unwrap();
        let n = text.lines().count();
        if n > MAX_FILE_LINES {
            problems.push(format!("{}: {n} lines (max {MAX_FILE_LINES})", f.display()));
        }
        for (name, line, len) in functions(&text) {
            if len > MAX_FN_LINES {
                problems.push(format!("{}:{line}: fn {name} is {len} lines (max {MAX_FN_LINES})", f.display()));
            }
        }
    }
    assert!(files.len() > 20, "found only {} source files", files.len());
    assert!(problems.is_empty(), "split these:\n{}", problems.join("\n"));
}

#[test]
fn the_function_counter_counts() {
    let text = "fn a() {\n    1;\n}\n\npub async fn b(\n    x: u8,\n) -> u8 {\n    x\n}\nfn decl();\n";
    assert_eq!(functions(text), vec![("a".into(), 1, 3), ("b".into(), 5, 5)]);
}

/// The layers, folders of src/, by rank. Two layers of one rank may not import each other: that
/// keeps the operator out of the relay's code and config out of the clients'.
const LAYERS: &[(&str, u8)] = &[
    ("core", 0),
    ("crd", 1),
    ("config", 2),
    ("clients", 2),
    ("tables", 3),
    ("doctor", 4),
    ("operator", 5),
    ("relay", 5),
    ("inbox", 5),
    ("chaos", 6),
    ("cli", 7),
];

fn rank(layer: &str) -> Option<u8> {
    LAYERS.iter().find(|(l, _)| *l == layer).map(|(_, r)| *r)
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `text` with comments and string and char literals blanked (newlines kept, so lines still count),
/// so that prose such as "`relay::fence`" or a path in a string is not read as an import.
fn strip(text: &str) -> String {
    let s: Vec<char> = text.chars().collect();
    let mut out: Vec<char> = Vec::with_capacity(s.len());
    let blank = |out: &mut Vec<char>, from: &[char]| out.extend(from.iter().map(|&c| if c == '\n' { '\n' } else { ' ' }));
    let mut i = 0;
    while i < s.len() {
        let prev_ident = i > 0 && is_ident(s[i - 1]);
        let end = if s[i] == '/' && s.get(i + 1) == Some(&'/') {
            (i..s.len()).find(|&j| s[j] == '\n').unwrap_or(s.len())
        } else if s[i] == '/' && s.get(i + 1) == Some(&'*') {
            block_comment_end(&s, i)
        } else if s[i] == '"' {
            string_end(&s, i + 1)
        } else if s[i] == 'r' && !(prev_ident && !(i > 0 && s[i - 1] == 'b' && (i < 2 || !is_ident(s[i - 2])))) {
            raw_string_end(&s, i).unwrap_or(i)
        } else if s[i] == '\'' {
            char_end(&s, i).unwrap_or(i)
        } else {
            i
        };
        if end > i {
            blank(&mut out, &s[i..end]);
            i = end;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out.into_iter().collect()
}

/// Just past the `*/` closing the (nestable) comment opened at `i`.
fn block_comment_end(s: &[char], mut i: usize) -> usize {
    let mut depth = 0;
    while i < s.len() {
        if s[i] == '/' && s.get(i + 1) == Some(&'*') {
            depth += 1;
            i += 2;
        } else if s[i] == '*' && s.get(i + 1) == Some(&'/') {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    s.len()
}

/// Just past the `"` closing a string whose text starts at `i`.
fn string_end(s: &[char], mut i: usize) -> usize {
    while i < s.len() {
        match s[i] {
            '\\' => i += 2,
            '"' => return i + 1,
            _ => i += 1,
        }
    }
    s.len()
}

/// Just past a raw string `r#"..."#` starting at `i` (the `r`), if one starts there.
fn raw_string_end(s: &[char], i: usize) -> Option<usize> {
    let hashes = s[i + 1..].iter().take_while(|&&c| c == '#').count();
    if s.get(i + 1 + hashes) != Some(&'"') {
        return None;
    }
    let close: Vec<char> = std::iter::once('"').chain(std::iter::repeat_n('#', hashes)).collect();
    let from = i + 2 + hashes;
    (from..s.len())
        .find(|&j| s[j..].starts_with(&close))
        .map(|j| j + close.len())
        .or(Some(s.len()))
}

/// Just past a char literal starting at `i` (the `'`); None for a lifetime.
fn char_end(s: &[char], i: usize) -> Option<usize> {
    if s.get(i + 1) == Some(&'\\') {
        return (i + 3..s.len()).find(|&j| s[j] == '\'').map(|j| j + 1);
    }
    (s.get(i + 2) == Some(&'\'')).then_some(i + 3)
}

/// (line, first segment, whether `::` follows it) of every path after `crate::` or `lockstep::`
/// in stripped code, each item of a grouped import (`crate::{a::b, c::{d, e}}`) counted.
fn crate_paths(code: &str) -> Vec<(usize, &'static str, String, bool)> {
    let s: Vec<char> = code.chars().collect();
    let mut found = Vec::new();
    for root in ["crate::", "lockstep::"] {
        let root_chars: Vec<char> = root.chars().collect();
        for i in 0..s.len() {
            if !s[i..].starts_with(&root_chars) || (i > 0 && (is_ident(s[i - 1]) || s[i - 1] == '$')) {
                continue;
            }
            let mut j = skip_space(&s, i + root_chars.len());
            if s.get(j) != Some(&'{') {
                found.push(segment(&s, j, root));
                continue;
            }
            let mut depth = 0;
            while j < s.len() {
                match s[j] {
                    c @ ('{' | ',') if (c == '{') == (depth == 0) && depth <= 1 => {
                        depth += usize::from(c == '{');
                        let k = skip_space(&s, j + 1);
                        if s.get(k).is_some_and(|&c| is_ident(c)) {
                            found.push(segment(&s, k, root));
                        }
                    }
                    '{' => depth += 1,
                    '}' if depth == 1 => break,
                    '}' => depth -= 1,
                    _ => {}
                }
                j += 1;
            }
        }
    }
    let line = |at: usize| s[..at].iter().filter(|&&c| c == '\n').count() + 1;
    let mut out: Vec<_> = found.into_iter().map(|(at, root, seg, more)| (line(at), root, seg, more)).collect();
    out.sort();
    out
}

fn skip_space(s: &[char], mut i: usize) -> usize {
    while s.get(i).is_some_and(|c| c.is_whitespace()) {
        i += 1;
    }
    i
}

/// (offset, root, identifier at `i`, whether `::` follows it).
fn segment(s: &[char], i: usize, root: &'static str) -> (usize, &'static str, String, bool) {
    let end = (i..s.len()).find(|&j| !is_ident(s[j])).unwrap_or(s.len());
    let k = skip_space(s, end);
    (i, root, s[i..end].iter().collect(), s[k..].starts_with(&[':', ':']))
}

/// Lines of `super::` chains that climb past the crate root: `depth` is the file's module depth
/// (src/relay/fence.rs is 2, src/relay/mod.rs 1), inline `mod x {` blocks add one each.
fn climbs_to_root(code: &str, depth: usize) -> Vec<usize> {
    let s: Vec<char> = code.chars().collect();
    let (mut braces, mut inline, mut found, mut line) = (0usize, Vec::new(), Vec::new(), 1);
    let mut i = 0;
    while i < s.len() {
        let word_start = i == 0 || !is_ident(s[i - 1]);
        match s[i] {
            '\n' => line += 1,
            '{' => braces += 1,
            '}' => {
                braces -= 1;
                if inline.last() == Some(&braces) {
                    inline.pop();
                }
            }
            'm' if word_start && s[i..].starts_with(&['m', 'o', 'd', ' ']) => {
                let name_end = (i + 4..s.len()).find(|&j| !is_ident(s[j])).unwrap_or(s.len());
                if s.get(skip_space(&s, name_end)) == Some(&'{') {
                    inline.push(braces);
                }
            }
            's' if word_start && s[i..].starts_with(&"super::".chars().collect::<Vec<_>>()) => {
                let mut n = 0;
                while s[i + n * 7..].starts_with(&"super::".chars().collect::<Vec<_>>()) {
                    n += 1;
                }
                if n >= depth + inline.len() {
                    found.push(line);
                }
                i += n * 7;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    found
}

/// The layering problems of one file, `rel` its path under src/ (its first component the layer).
fn layer_problems(rel: &[&str], text: &str) -> Vec<String> {
    let (layer, name) = (rel[0], rel.join("/"));
    let Some(own) = rank(layer) else {
        return vec![format!("src/{name}: {layer} is not a layer")];
    };
    let code = strip(text);
    let mut problems = Vec::new();
    for (line, root, seg, more) in crate_paths(&code) {
        let at = format!("src/{name}:{line}");
        match rank(&seg) {
            _ if root == "lockstep::" => problems.push(format!("{at}: {layer} names lockstep::{seg}; inside the crate write crate::")),
            _ if !more => problems.push(format!(
                "{at}: {layer} imports crate::{seg} itself; name the item (crate::{seg}::x::...)"
            )),
            None => problems.push(format!("{at}: {layer} imports crate::{seg}, which is not a layer")),
            Some(r) if r > own || (r == own && seg != layer) => {
                problems.push(format!("{at}: {layer} (rank {own}) imports {seg} (rank {r})"))
            }
            Some(_) => {}
        }
    }
    let depth = rel.len() - usize::from(rel.last() == Some(&"mod.rs"));
    for line in climbs_to_root(&code, depth) {
        problems.push(format!("src/{name}:{line}: super:: climbs to the crate root; write crate::"));
    }
    problems
}

#[test]
fn src_holds_only_the_layers_in_rank_order() {
    let src = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src"));
    let mut loose = Vec::new();
    for e in fs::read_dir(src).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ok = if e.path().is_dir() {
            rank(&name).is_some()
        } else {
            name == "lib.rs" || name == "main.rs"
        };
        if !ok {
            loose.push(name);
        }
    }
    assert!(
        loose.is_empty(),
        "src/ holds only lib.rs, main.rs and the layers {LAYERS:?}; move {loose:?} into one"
    );
    let lib = strip(&fs::read_to_string(src.join("lib.rs")).unwrap());
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';'))
        .collect();
    let layers: Vec<&str> = LAYERS.iter().map(|(l, _)| *l).collect();
    assert_eq!(
        declared, layers,
        "lib.rs declares each layer with `pub mod`, in rank order, and nothing else"
    );
    assert!(!lib.contains("fn ") && !lib.contains("use "), "lib.rs holds only the layers");
}

#[test]
fn layers_import_only_their_own_and_lower_ranks() {
    let src = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src"));
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut problems = Vec::new();
    let mut checked = 0;
    for f in &files {
        let rel: Vec<String> = f
            .strip_prefix(src)
            .unwrap()
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        if rel.len() < 2 {
            continue; // lib.rs and main.rs: the top, which may use anything
        }
        let rel: Vec<&str> = rel.iter().map(String::as_str).collect();
        problems.extend(layer_problems(&rel, &fs::read_to_string(f).unwrap()));
        checked += 1;
    }
    assert!(checked > 100, "checked only {checked} files");
    assert!(
        problems.is_empty(),
        "imports against the layers (see LAYERS in tests/layout.rs):\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_layer_scanner_reads_paths_not_prose() {
    let text = "use crate::{core::sql::Ident, tables::{locks, lag::measure}};\n\
                fn f() { crate::relay::run(x) }\n\
                // crate::operator::metrics in a comment\n\
                /* crate::chaos */ const S: &str = \"crate::cli::x\";\n\
                const C: char = '\"'; fn g<'a>(x: &'a str) { crate::inbox::h(x); }\n";
    let paths: Vec<(usize, String)> = crate_paths(&strip(text)).into_iter().map(|(l, _, s, _)| (l, s)).collect();
    let want = [(1, "core"), (1, "tables"), (2, "relay"), (5, "inbox")];
    assert_eq!(paths, want.map(|(l, s)| (l, s.to_owned())));
    let p = layer_problems(&["tables", "x.rs"], text);
    assert_eq!(
        p,
        [
            "src/tables/x.rs:2: tables (rank 3) imports relay (rank 5)",
            "src/tables/x.rs:5: tables (rank 3) imports inbox (rank 5)"
        ]
    );
    let same_rank = layer_problems(&["config", "mod.rs"], "use crate::clients::db::Pools;\nuse crate::core;\n");
    assert_eq!(same_rank.len(), 2, "{same_rank:?}");
    assert_eq!(
        climbs_to_root("use super::super::x;\nmod t {\n    use super::super::y;\n}\n", 2),
        vec![1]
    );
    assert_eq!(climbs_to_root("mod t {\n    use super::super::y;\n}\n", 1), vec![2]);
}
