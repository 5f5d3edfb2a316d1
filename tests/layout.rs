//! The code stays in rooms a reader can hold: no source file over 450 lines, no function over 80
//! (counted from its `fn` line to its closing brace, as rustfmt lays it out).

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
