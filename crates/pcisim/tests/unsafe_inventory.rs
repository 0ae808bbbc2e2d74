//! docs/security.md's section "Where `unsafe` is" lists every `unsafe` site of the project; this
//! test holds that list to the code so it cannot drift when code moves.
//!
//! It scans every tracked `.rs` file (`git ls-files`: the workspace, `guest-tests/` and `fuzz/`)
//! for `unsafe` blocks, `unsafe fn` and `unsafe impl` (comments and string literals are blanked
//! out first, so the word in prose is not a site) and asserts that
//!
//! - every block and impl has a `// SAFETY:` comment right above it (the comment run ending on
//!   the line above, or above the one or two lines of the statement the block is part of), and
//!   every `unsafe fn` a `# Safety` section in its doc comment;
//! - the doc has one `### \`path\` (N)` section per file with sites, N being the number of sites,
//!   and one table row per site with its line, kind, the unsafe calls it makes and its own
//!   SAFETY text (on one line, shortened if long);
//! - the intro's total ("Inventory (N sites") is the number of sites.
//!
//! On a mismatch it prints every missing, stale and differing row as `file:line`. To regenerate
//! the tables (the prose under each heading is kept):
//!
//! ```sh
//! UNSAFE_INVENTORY_WRITE=1 cargo test -p pcisim --test unsafe_inventory
//! ```

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

const DOC: &str = "docs/security.md";
const SECTION: &str = "## Where `unsafe` is";
/// A SAFETY text longer than this is cut at a word boundary and ends with "…".
const MAX_GUARD: usize = 360;

/// Methods and functions whose call makes a block `unsafe` (besides anything under `libc::`,
/// `mem::`, `ptr::` and the project's own `unsafe fn`s), named in the "calls" column.
const UNSAFE_CALLS: &[&str] = &[
    "from_raw_fd",
    "from_raw_parts",
    "from_raw_parts_mut",
    "from_ptr",
    "pre_exec",
    "read_volatile",
    "write_volatile",
    "read_unaligned",
    "write_unaligned",
    "copy_nonoverlapping",
    "copy_from_nonoverlapping",
    "write_bytes",
    "transmute",
    "zeroed",
    "assume_init",
    "add",
    "offset",
    "byte_add",
    "set_user_memory_region",
    "from_utf8_unchecked",
    "get_unchecked",
    "get_unchecked_mut",
    "set_len",
    // vm_memory::VolatileSlice::new(ptr, len)
    "new",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Block,
    Fn,
    Impl,
}

impl Kind {
    fn doc(self) -> &'static str {
        match self {
            Kind::Block => "block",
            Kind::Fn => "`unsafe fn`",
            Kind::Impl => "`unsafe impl`",
        }
    }
}

/// One `unsafe` site as the code has it.
#[derive(Debug, Clone)]
struct Site {
    line: usize,
    kind: Kind,
    /// The "calls" cell: the unsafe calls of a block, the declared fn, the implemented trait.
    calls: String,
    /// The site's own SAFETY text (`# Safety` for an `unsafe fn`); None when it has none.
    guards: Option<String>,
}

/// One table row as the doc has it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    line: String,
    kind: String,
    calls: String,
    guards: String,
}

impl Site {
    fn row(&self) -> Row {
        Row {
            line: self.line.to_string(),
            kind: self.kind.doc().to_string(),
            calls: self.calls.clone(),
            guards: self
                .guards
                .clone()
                .unwrap_or_else(|| "(no SAFETY comment)".to_string()),
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The tracked `.rs` files, relative to the root, sorted.
fn rust_files(root: &Path) -> Vec<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["ls-files", "-z", "--", "*.rs"])
        .output()
        .expect("git runs (the tests run in a checkout)");
    assert!(out.status.success(), "git ls-files failed: {out:?}");
    let mut files: Vec<String> = String::from_utf8(out.stdout)
        .expect("paths are UTF-8")
        .split('\0')
        .filter(|p| !p.is_empty())
        // A file deleted in the work tree but not yet from the index is no site.
        .filter(|p| root.join(p).is_file())
        .map(str::to_string)
        .collect();
    files.sort();
    files
}

/// `src` with comments and the contents of string and char literals replaced by spaces (line
/// breaks kept), so a word found in the result is code.
fn blank_non_code(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let blank = |ch: char| if ch == '\n' { '\n' } else { ' ' };
    let is_ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        let next = c.get(i + 1).copied();
        if ch == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if ch == '/' && next == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
        } else if ch == 'r'
            && (i == 0
                || !is_ident(c[i - 1])
                || (c[i - 1] == 'b' && (i < 2 || !is_ident(c[i - 2]))))
            && matches!(next, Some('"') | Some('#'))
        {
            // A raw string r"..." / r#"..."# (or an identifier starting with r#).
            let mut j = i + 1;
            let mut hashes = 0;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(ch);
                i += 1;
                continue;
            }
            out.extend(std::iter::repeat_n(' ', j + 1 - i));
            i = j + 1;
            while i < c.len() {
                if c[i] == '"' && (0..hashes).all(|k| c.get(i + 1 + k) == Some(&'#')) {
                    out.extend(std::iter::repeat_n(' ', 1 + hashes));
                    i += 1 + hashes;
                    break;
                }
                out.push(blank(c[i]));
                i += 1;
            }
        } else if ch == '"' {
            out.push(' ');
            i += 1;
            while i < c.len() {
                if c[i] == '\\' {
                    out.push(' ');
                    if let Some(&e) = c.get(i + 1) {
                        out.push(blank(e));
                    }
                    i += 2;
                } else if c[i] == '"' {
                    out.push(' ');
                    i += 1;
                    break;
                } else {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
        } else if ch == '\'' && next == Some('\\') {
            // An escaped char literal: '\n', '\'', '\u{..}'.
            out.push_str("  ");
            i += 2;
            if i < c.len() {
                out.push(' ');
                i += 1;
            }
            while i < c.len() && c[i] != '\'' {
                out.push(' ');
                i += 1;
            }
            out.push(' ');
            i += 1;
        } else if ch == '\'' && c.get(i + 2) == Some(&'\'') {
            // A plain char literal 'x' (a lifetime 'a has no closing quote).
            out.push_str("   ");
            i += 3;
        } else {
            out.push(ch);
            i += 1;
        }
    }
    out
}

/// The `unsafe` sites of one file's source.
fn scan(src: &str, unsafe_fns: &[String]) -> Vec<Site> {
    let code = blank_non_code(src);
    let raw: Vec<&str> = src.lines().collect();
    let code_lines: Vec<&str> = code.lines().collect();
    let bytes = code.as_bytes();
    let mut sites = Vec::new();
    let mut from = 0;
    while let Some(off) = code[from..].find("unsafe") {
        let at = from + off;
        from = at + "unsafe".len();
        let before_ok = at == 0 || !is_ident_byte(bytes[at - 1]);
        let after_ok = bytes.get(from).is_none_or(|b| !is_ident_byte(*b));
        if !before_ok || !after_ok {
            continue;
        }
        let rest = code[from..].trim_start();
        let kind = if rest.starts_with('{') {
            Kind::Block
        } else if word_at(rest, "fn") || word_at(rest, "extern") {
            Kind::Fn
        } else if word_at(rest, "impl") {
            Kind::Impl
        } else {
            // `unsafe` as an attribute argument or similar: not a site of its own.
            continue;
        };
        let line = code[..at].matches('\n').count() + 1;
        let calls = match kind {
            Kind::Block => {
                let open = code.len() - rest.len();
                block_calls(&code[open..block_end(&code, open)], unsafe_fns)
            }
            Kind::Fn => {
                let name = rest
                    .split_once("fn")
                    .map(|(_, r)| r.trim_start())
                    .unwrap_or("")
                    .split(|ch: char| !(ch.is_alphanumeric() || ch == '_'))
                    .next()
                    .unwrap_or("");
                format!("declares `{name}`")
            }
            Kind::Impl => {
                let head = rest["impl".len()..].split('{').next().unwrap_or("");
                format!("`{}`", squash(head))
            }
        };
        let guards = match kind {
            Kind::Fn => safety_doc(&raw, line - 1),
            _ => safety_comment(&raw, &code_lines, line - 1),
        };
        sites.push(Site {
            line,
            kind,
            calls,
            guards: guards.map(|g| shorten(&squash(&g))),
        });
    }
    sites
}

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn word_at(s: &str, w: &str) -> bool {
    s.starts_with(w) && s.as_bytes().get(w.len()).is_none_or(|b| !is_ident_byte(*b))
}

/// The index just past the `}` matching the `{` at `open` (blanked code has no braces in
/// literals or comments).
fn block_end(code: &str, open: usize) -> usize {
    let mut depth = 0usize;
    for (i, b) in code.bytes().enumerate().skip(open) {
        match b {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
    }
    code.len()
}

/// The unsafe calls in a block's code: `libc::`/`mem::`/`ptr::` paths, the methods and functions
/// of [`UNSAFE_CALLS`] and the project's own `unsafe fn`s, each once, in order of appearance.
fn block_calls(block: &str, unsafe_fns: &[String]) -> String {
    let b = block.as_bytes();
    let mut found: Vec<String> = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !is_ident_byte(b[i]) || (i > 0 && is_ident_byte(b[i - 1])) {
            i += 1;
            continue;
        }
        // A path a::b::c starting here.
        let start = i;
        let mut j = i;
        loop {
            while j < b.len() && is_ident_byte(b[j]) {
                j += 1;
            }
            if block[j..].starts_with("::") && b.get(j + 2).is_some_and(|x| is_ident_byte(*x)) {
                j += 2;
            } else {
                break;
            }
        }
        let path = &block[start..j];
        let after = block[j..].trim_start();
        let called = after.starts_with('(') || after.starts_with("::<") || after.starts_with('!');
        let method = start > 0 && b[start - 1] == b'.';
        let last = path.rsplit("::").next().unwrap_or(path);
        // Types (`libc::Ioctl::from`), `size_of` and null pointers are no unsafe calls.
        let listed = if last == "new" {
            path.ends_with("VolatileSlice::new")
        } else {
            UNSAFE_CALLS.contains(&last) || unsafe_fns.iter().any(|f| f == last)
        };
        // A path through a type (`libc::Ioctl::from`) is a plain constructor or conversion.
        let mut segs: Vec<&str> = path.split("::").collect();
        segs.pop();
        let plain = segs.iter().any(|seg| seg.starts_with(char::is_uppercase)) && !listed;
        let safe = matches!(
            last,
            "size_of"
                | "size_of_val"
                | "align_of"
                | "null"
                | "null_mut"
                | "addr_of"
                | "addr_of_mut"
        );
        let name = if plain || safe {
            None
        } else if (path.starts_with("libc::") && (called || last.starts_with("CMSG_")))
            || ((path.starts_with("mem::")
                || path.starts_with("ptr::")
                || path.starts_with("std::mem::")
                || path.starts_with("std::ptr::"))
                && called)
        {
            Some(path.strip_prefix("std::").unwrap_or(path).to_string())
        } else if called
            && listed
            // `.add(n)` / `.offset(n)` are pointer arithmetic only as methods.
            && (method || !matches!(last, "add" | "offset"))
        {
            Some(if method {
                format!(".{last}")
            } else {
                path.to_string()
            })
        } else {
            None
        };
        if let Some(n) = name {
            // CMSG_* macros and libc constants read as one family each.
            let n = if n.starts_with("libc::CMSG_") {
                "libc::CMSG_*".to_string()
            } else {
                n
            };
            if (called || n == "libc::CMSG_*") && !found.contains(&n) {
                found.push(n);
            }
        }
        i = j.max(i + 1);
    }
    if found.is_empty() {
        // No call: what is left to be unsafe is a raw pointer deref or a union field read.
        let deref = block.contains("(*") || block.contains("&*") || block.contains("{ *");
        if deref {
            "raw pointer deref"
        } else {
            "union field read"
        }
        .to_string()
    } else {
        found
            .iter()
            .map(|f| format!("`{f}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The `// SAFETY:` text of the block or impl at line index `at`: in the run of `//` comment
/// lines ending right above it, or above up to two lines of the statement it is part of (a
/// `let x =` whose value is the block), from the `SAFETY:` on.
fn safety_comment(raw: &[&str], code: &[&str], at: usize) -> Option<String> {
    let mut end = at;
    for _ in 0..3 {
        if end == 0 {
            return None;
        }
        let above = raw[end - 1].trim_start();
        if above.starts_with("//") && !above.starts_with("///") && !above.starts_with("//!") {
            break;
        }
        // A line of the same statement (it does not end one) may stand between.
        let c = code[end - 1].trim_end();
        if c.trim().is_empty() || c.ends_with(';') || c.ends_with('}') || c.ends_with('{') {
            return None;
        }
        end -= 1;
    }
    let mut start = end;
    while start > 0 {
        let l = raw[start - 1].trim_start();
        if l.starts_with("//") && !l.starts_with("///") && !l.starts_with("//!") {
            start -= 1;
        } else {
            break;
        }
    }
    let run: Vec<&str> = raw[start..end]
        .iter()
        .map(|l| l.trim_start().trim_start_matches("//").trim())
        .collect();
    let first = run.iter().position(|l| l.contains("SAFETY:"))?;
    let mut text = run[first..].join(" ");
    text = text[text.find("SAFETY:")? + "SAFETY:".len()..].to_string();
    Some(text)
}

/// The `# Safety` section of the doc comment above the `unsafe fn` at line index `at`.
fn safety_doc(raw: &[&str], at: usize) -> Option<String> {
    let mut start = at;
    while start > 0 {
        let l = raw[start - 1].trim_start();
        if l.starts_with("///") || l.starts_with("#[") {
            start -= 1;
        } else {
            break;
        }
    }
    let doc: Vec<&str> = raw[start..at]
        .iter()
        .map(|l| l.trim_start())
        .filter(|l| l.starts_with("///"))
        .map(|l| l.trim_start_matches("///").trim())
        .collect();
    let h = doc.iter().position(|l| *l == "# Safety")?;
    let body: Vec<&str> = doc[h + 1..]
        .iter()
        .take_while(|l| !l.starts_with('#'))
        .copied()
        .collect();
    Some(body.join(" "))
}

/// Whitespace runs to one space, trimmed.
fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One table cell: at most [`MAX_GUARD`] characters (cut at a word), `|` escaped.
fn shorten(s: &str) -> String {
    let mut out = String::new();
    for w in s.split(' ') {
        if out.chars().count() + 1 + w.chars().count() > MAX_GUARD {
            out.push_str(" …");
            break;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(w);
    }
    out.replace('|', "\\|")
}

/// Every file's sites (files without any are left out), by path.
fn inventory(root: &Path) -> BTreeMap<String, Vec<Site>> {
    let files = rust_files(root);
    let sources: Vec<(String, String)> = files
        .into_iter()
        .map(|f| {
            let src = std::fs::read_to_string(root.join(&f))
                .unwrap_or_else(|e| panic!("reading {f}: {e}"));
            (f, src)
        })
        .collect();
    // The project's own unsafe fns: calling one is an unsafe call worth naming.
    let mut unsafe_fns: Vec<String> = Vec::new();
    for (_, src) in &sources {
        for s in scan(src, &[]) {
            if s.kind == Kind::Fn {
                if let Some(n) = s.calls.strip_prefix("declares `") {
                    unsafe_fns.push(n.trim_end_matches('`').to_string());
                }
            }
        }
    }
    sources
        .into_iter()
        .filter_map(|(f, src)| {
            let sites = scan(&src, &unsafe_fns);
            (!sites.is_empty()).then_some((f, sites))
        })
        .collect()
}

/// The order of the doc's sections: library and binary sources, then tests, fuzz, guest-tests.
fn section_order(path: &str) -> (u8, String) {
    let class = if path.starts_with("guest-tests/") {
        3
    } else if path.starts_with("fuzz/") {
        2
    } else if path.contains("/tests/") {
        1
    } else {
        0
    };
    (class, path.to_string())
}

/// A file section of the doc: its heading's count, the prose under it, its rows.
#[derive(Debug, Default)]
struct DocSection {
    count: Option<usize>,
    prose: Vec<String>,
    rows: Vec<Row>,
}

/// The doc split: text before the inventory section's file sections, the file sections by
/// path (in doc order), the text from the next `## ` section on.
struct Doc {
    head: String,
    sections: Vec<(String, DocSection)>,
    tail: String,
}

fn split_cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    let mut cells = Vec::new();
    let mut cur = String::new();
    let mut prev = ' ';
    for ch in inner.chars() {
        if ch == '|' && prev != '\\' {
            cells.push(cur.trim().to_string());
            cur.clear();
        } else {
            cur.push(ch);
        }
        prev = ch;
    }
    cells.push(cur.trim().to_string());
    cells
}

fn parse_doc(text: &str) -> Doc {
    let start = text
        .find(SECTION)
        .unwrap_or_else(|| panic!("{DOC} has no section {SECTION:?}"));
    let after = start + SECTION.len();
    let end = text[after..]
        .find("\n## ")
        .map_or(text.len(), |i| after + i + 1);
    let body = &text[start..end];
    let first = body.find("\n### ").map_or(body.len(), |i| i + 1);
    let head = text[..start + first].to_string();
    let mut sections: Vec<(String, DocSection)> = Vec::new();
    for line in body[first..].lines() {
        if let Some(h) = line.strip_prefix("### ") {
            let path = h
                .split('`')
                .nth(1)
                .unwrap_or_else(|| panic!("{DOC}: heading without a `path`: {line}"))
                .to_string();
            let count = h
                .rsplit_once('(')
                .and_then(|(_, n)| n.trim_end_matches(')').trim().parse().ok());
            sections.push((
                path,
                DocSection {
                    count,
                    ..DocSection::default()
                },
            ));
            continue;
        }
        let Some((_, sec)) = sections.last_mut() else {
            continue;
        };
        if line.starts_with('|') {
            let cells = split_cells(line);
            if cells
                .first()
                .is_some_and(|c| c == "line" || c.starts_with("---"))
            {
                continue;
            }
            let cell = |i: usize| cells.get(i).cloned().unwrap_or_default();
            sec.rows.push(Row {
                line: cell(0),
                kind: cell(1),
                calls: cell(2),
                guards: cell(3),
            });
        } else if sec.rows.is_empty() {
            sec.prose.push(line.to_string());
        }
    }
    Doc {
        head,
        sections,
        tail: text[end..].to_string(),
    }
}

/// The intro's stated total: "Inventory (N sites".
fn stated_total(head: &str) -> Option<usize> {
    let i = head.find("Inventory (")? + "Inventory (".len();
    head[i..].split(' ').next()?.parse().ok()
}

/// The intro's per-directory counts: every "N in `dir`" of the "Inventory (" paragraph.
fn stated_parts(head: &str) -> Vec<(usize, String)> {
    let Some(i) = head.find("Inventory (") else {
        return Vec::new();
    };
    let para = squash(head[i..].split("\n\n").next().unwrap_or(""));
    let mut parts = Vec::new();
    let mut rest = para.as_str();
    while let Some(j) = rest.find(" in `") {
        let n = rest[..j]
            .rsplit(|ch: char| !ch.is_ascii_digit())
            .next()
            .and_then(|d| d.parse().ok());
        let dir = rest[j + 5..].split('`').next().unwrap_or("");
        if let Some(n) = n {
            parts.push((n, dir.to_string()));
        }
        rest = &rest[j + 5..];
    }
    parts
}

/// Every difference between the doc and the code, one line each.
fn differences(doc: &Doc, code: &BTreeMap<String, Vec<Site>>) -> Vec<String> {
    let mut diff = Vec::new();
    let total: usize = code.values().map(Vec::len).sum();
    match stated_total(&doc.head) {
        Some(n) if n == total => {}
        n => diff.push(format!(
            "intro: states {n:?} sites (\"Inventory (N sites\"), the code has {total}"
        )),
    }
    let parts = stated_parts(&doc.head);
    for (n, dir) in &parts {
        let have: usize = code
            .iter()
            .filter(|(p, _)| p.starts_with(&format!("{dir}/")))
            .map(|(_, s)| s.len())
            .sum();
        if have != *n {
            diff.push(format!("intro: states {n} in `{dir}`, the code has {have}"));
        }
    }
    let parts_sum: usize = parts.iter().map(|(n, _)| n).sum();
    if parts_sum != total {
        diff.push(format!(
            "intro: the \"N in `dir`\" counts add up to {parts_sum}, not the {total} sites \
             (a directory with sites is not named)"
        ));
    }
    let doc_map: BTreeMap<&str, &DocSection> =
        doc.sections.iter().map(|(p, s)| (p.as_str(), s)).collect();
    for (path, sec) in &doc.sections {
        if !code.contains_key(path) {
            let what = if Path::new(path).extension().is_some_and(|e| e == "rs") {
                "has no unsafe site (or is no tracked file)"
            } else {
                "is not a file: sections name one .rs file each"
            };
            diff.push(format!(
                "stale section `{path}` ({} rows): {what}",
                sec.rows.len()
            ));
        }
    }
    for (path, sites) in code {
        let Some(sec) = doc_map.get(path.as_str()) else {
            diff.push(format!("missing section `{path}` ({} sites)", sites.len()));
            for s in sites {
                diff.push(format!("  missing row {path}:{} {}", s.line, s.kind.doc()));
            }
            continue;
        };
        if sec.count != Some(sites.len()) {
            diff.push(format!(
                "`{path}`: heading says ({}), the file has {} sites",
                sec.count.map_or("?".to_string(), |n| n.to_string()),
                sites.len()
            ));
        }
        let mut rows: Vec<&Row> = sec.rows.iter().collect();
        for s in sites {
            let want = s.row();
            if let Some(i) = rows.iter().position(|r| **r == want) {
                rows.remove(i);
                continue;
            }
            if let Some(i) = rows.iter().position(|r| r.line == want.line) {
                let r = rows.remove(i);
                for (what, have, should) in [
                    ("kind", &r.kind, &want.kind),
                    ("calls", &r.calls, &want.calls),
                    ("guards", &r.guards, &want.guards),
                ] {
                    if have != should {
                        diff.push(format!(
                            "  {path}:{}: {what} is {have:?}, the code says {should:?}",
                            s.line
                        ));
                    }
                }
                continue;
            }
            diff.push(format!(
                "  missing row {path}:{} {} ({})",
                s.line,
                s.kind.doc(),
                want.calls
            ));
        }
        for r in rows {
            diff.push(format!(
                "  stale row {path}:{} {} ({}): no unsafe site on that line",
                r.line, r.kind, r.calls
            ));
        }
    }
    diff
}

fn table(sites: &[Site]) -> String {
    let mut t = String::from(
        "| line | kind | calls | what it guards (its `SAFETY:` comment) |\n|---|---|---|---|\n",
    );
    for s in sites {
        let r = s.row();
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} |",
            r.line, r.kind, r.calls, r.guards
        );
    }
    t
}

/// The doc with the inventory's tables, counts and total taken from the code; the prose under
/// each file heading is kept.
fn regenerated(doc: &Doc, code: &BTreeMap<String, Vec<Site>>) -> String {
    let total: usize = code.values().map(Vec::len).sum();
    let mut out = doc.head.clone();
    if let Some(n) = stated_total(&doc.head) {
        out = out.replacen(
            &format!("Inventory ({n} sites"),
            &format!("Inventory ({total} sites"),
            1,
        );
    }
    let prose: BTreeMap<&str, &Vec<String>> = doc
        .sections
        .iter()
        .map(|(p, s)| (p.as_str(), &s.prose))
        .collect();
    let mut paths: Vec<&String> = code.keys().collect();
    paths.sort_by_key(|p| section_order(p));
    for path in paths {
        let sites = &code[path];
        let _ = writeln!(out, "### `{path}` ({})\n", sites.len());
        let text: Vec<&String> = prose
            .get(path.as_str())
            .map(|p| p.iter().filter(|l| !l.trim().is_empty()).collect())
            .unwrap_or_default();
        if !text.is_empty() {
            for l in text {
                let _ = writeln!(out, "{l}");
            }
            out.push('\n');
        }
        out.push_str(&table(sites));
        out.push('\n');
    }
    out.push_str(&doc.tail);
    out
}

#[test]
fn every_unsafe_site_has_a_safety_comment() {
    let code = inventory(&root());
    let mut bare = Vec::new();
    for (path, sites) in &code {
        for s in sites {
            if s.guards.as_deref().is_none_or(|g| g.trim().is_empty()) {
                let want = match s.kind {
                    Kind::Fn => "a `# Safety` section in its doc comment",
                    _ => "a `// SAFETY:` comment right above it",
                };
                bare.push(format!("{path}:{} {} lacks {want}", s.line, s.kind.doc()));
            }
        }
    }
    assert!(
        bare.is_empty(),
        "unsafe without its reason:\n{}",
        bare.join("\n")
    );
}

#[test]
fn security_md_lists_exactly_the_unsafe_sites_of_the_code() {
    let root = root();
    let code = inventory(&root);
    // The generator: with UNSAFE_INVENTORY_WRITE set, rewrite the tables from the code first
    // (the prose under each heading is kept), then check as always.
    if std::env::var_os("UNSAFE_INVENTORY_WRITE").is_some() {
        let text = std::fs::read_to_string(root.join(DOC)).unwrap();
        std::fs::write(root.join(DOC), regenerated(&parse_doc(&text), &code)).unwrap();
        eprintln!("wrote {DOC}");
    }
    // The instrument works: the scan finds the sites this test knows exist.
    assert!(code.values().map(Vec::len).sum::<usize>() > 100, "{code:?}");
    assert!(
        code.get("crates/vfio-user/src/shm.rs")
            .is_some_and(|s| s.iter().any(|s| s.kind == Kind::Impl)),
        "the scan misses shm.rs's unsafe impls"
    );
    let text = std::fs::read_to_string(root.join(DOC)).unwrap();
    let doc = parse_doc(&text);
    let diff = differences(&doc, &code);
    assert!(
        diff.is_empty(),
        "{DOC} \"Where `unsafe` is\" does not match the code ({} differences):\n{}\n\n\
         Regenerate: UNSAFE_INVENTORY_WRITE=1 cargo test -p pcisim --test unsafe_inventory \
         (then write the prose of any new file's section and the counts of the intro)",
        diff.len(),
        diff.join("\n")
    );
}

#[test]
fn the_scan_sees_code_only() {
    let src = "// unsafe { x }\n\
               let s = \"unsafe { y }\";\n\
               let r = r#\"unsafe fn z\"#;\n\
               let c = '{';\n\
               /* unsafe impl A for B {} */\n\
               fn a<'a>(x: &'a u8) {}\n\
               // SAFETY: reason\n\
               let v = unsafe { libc::getpid() };\n\
               let not_unsafe_word = 1;\n\
               #[allow(unsafe_code)]\n\
               // SAFETY: p is live\n\
               let f: u8 =\n    unsafe { p.read_volatile() };\n\
               unsafe { ptr::write(q, 1) };\n";
    let sites = scan(src, &[]);
    let lines: Vec<(usize, Kind)> = sites.iter().map(|s| (s.line, s.kind)).collect();
    assert_eq!(
        lines,
        vec![(8, Kind::Block), (13, Kind::Block), (14, Kind::Block)]
    );
    assert_eq!(sites[0].calls, "`libc::getpid`");
    assert_eq!(sites[0].guards.as_deref(), Some("reason"));
    assert_eq!(sites[1].calls, "`.read_volatile`");
    assert_eq!(sites[1].guards.as_deref(), Some("p is live"));
    assert_eq!(
        sites[2].guards, None,
        "a SAFETY comment two statements up is not its own"
    );
}
