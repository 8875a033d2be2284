//! Function-length check of `cargo xtask lint`: no function of the
//! product's source over [`MAX_LINES`] lines.
//!
//! It scans the `.rs` files under [`DIRS`] (product source only: the
//! crates' `tests/` and `benches/` are not under `src/`, and items marked
//! `#[cfg(test)]` inside `src/`, the unit-test modules, are skipped too).
//! Every `fn` item with a body counts, free functions, methods and nested
//! functions alike, whatever its qualifiers (`pub(crate)`, `async`,
//! `const`, `unsafe`, `extern`); a declaration without a body
//! (`fn f(&self);` in a trait) does not. A function's length is the count
//! of lines from the line of its `fn` keyword to the line of its closing
//! brace, both included (attributes and doc comments are not counted).
//!
//! Written by hand, without `syn`: a line counter needs no parser, only a
//! lexer that knows where braces are code and where they are text (string
//! literals, raw strings, char literals, comments).
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// The longest function allowed, in lines.
pub const MAX_LINES: usize = 120;

/// The directories scanned, relative to the workspace root.
pub const DIRS: &[&str] = &["node-agent/src", "clustermesh-apiserver/src", "cli/src"];

/// A function with a body, as found by [`functions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Function {
    pub name: String,
    /// 1-based line of the `fn` keyword.
    pub line: usize,
    /// Lines from the `fn` line to the closing brace, both included.
    pub lines: usize,
}

/// A function over the limit, in the file `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLong {
    pub path: PathBuf,
    pub function: Function,
}

impl std::fmt::Display for TooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{} fn {}: {} lines (max {MAX_LINES})",
            self.path.display(),
            self.function.line,
            self.function.name,
            self.function.lines
        )
    }
}

/// The check of `cargo xtask lint`: fails with the list of the functions
/// over [`MAX_LINES`] under [`DIRS`] of the workspace.
pub fn check() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?;
    eprintln!(
        "+ function length (max {MAX_LINES} lines): {}",
        DIRS.join(" ")
    );
    let dirs: Vec<PathBuf> = DIRS.iter().map(|d| root.join(d)).collect();
    let too_long = scan(root, &dirs, MAX_LINES)?;
    if too_long.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = too_long.iter().map(ToString::to_string).collect();
    anyhow::bail!(
        "{} functions over {MAX_LINES} lines:\n{}",
        too_long.len(),
        list.join("\n")
    )
}

/// The functions over `max` lines in the `.rs` files under `dirs`, in
/// path order, their paths relative to `root`. A missing directory is an
/// error: a renamed crate must not silently leave the check.
pub fn scan(root: &Path, dirs: &[PathBuf], max: usize) -> anyhow::Result<Vec<TooLong>> {
    let mut files = vec![];
    for dir in dirs {
        rust_files(dir, &mut files)?;
    }
    files.sort();
    let mut too_long = vec![];
    for path in files {
        let source = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let shown = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
        too_long.extend(
            functions(&source)
                .into_iter()
                .filter(|f| f.lines > max)
                .map(|function| TooLong {
                    path: shown.clone(),
                    function,
                }),
        );
    }
    Ok(too_long)
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// A token of Rust source, as far as this check needs: comments, literals
/// and lifetimes are dropped (their braces are text), identifiers and
/// keywords are kept by name, every other character is punctuation.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    Punct(char),
}

/// The tokens of `source` with their 1-based lines.
fn tokens(source: &str) -> Vec<(Token, usize)> {
    Lexer {
        chars: source.chars().collect(),
        pos: 0,
        line: 1,
    }
    .run()
}

struct Lexer {
    chars: Vec<char>,
    pos: usize,
    line: usize,
}

impl Lexer {
    fn peek(&self, ahead: usize) -> Option<char> {
        self.chars.get(self.pos + ahead).copied()
    }

    /// Moves one character on, counting lines.
    fn bump(&mut self) {
        if self.peek(0) == Some('\n') {
            self.line += 1;
        }
        self.pos += 1;
    }

    fn run(mut self) -> Vec<(Token, usize)> {
        let mut out = vec![];
        while let Some(c) = self.peek(0) {
            let line = self.line;
            match c {
                '/' if self.peek(1) == Some('/') => self.line_comment(),
                '/' if self.peek(1) == Some('*') => self.block_comment(),
                '"' => self.string(),
                '\'' => self.quote(),
                c if c == '_' || c.is_alphanumeric() => {
                    let ident = self.ident();
                    if ident == "r" && self.raw_ident_ahead() {
                        self.bump();
                        out.push((Token::Ident(format!("r#{}", self.ident())), line));
                    } else if !self.literal_after_prefix(&ident) {
                        out.push((Token::Ident(ident), line));
                    }
                }
                c if c.is_whitespace() => self.bump(),
                c => {
                    out.push((Token::Punct(c), line));
                    self.bump();
                }
            }
        }
        out
    }

    fn line_comment(&mut self) {
        while self.peek(0).is_some_and(|c| c != '\n') {
            self.bump();
        }
    }

    /// `/* ... */`, nested ones included (Rust's block comments nest).
    fn block_comment(&mut self) {
        let mut depth = 0;
        while let Some(c) = self.peek(0) {
            if c == '/' && self.peek(1) == Some('*') {
                depth += 1;
                self.bump();
            } else if c == '*' && self.peek(1) == Some('/') {
                depth -= 1;
                self.bump();
                if depth == 0 {
                    self.bump();
                    return;
                }
            }
            self.bump();
        }
    }

    /// `"..."` with escapes, from the opening quote.
    fn string(&mut self) {
        self.bump();
        while let Some(c) = self.peek(0) {
            self.bump();
            match c {
                '\\' => self.bump(),
                '"' => return,
                _ => {}
            }
        }
    }

    /// A raw string from its `#`s or quote: `"..."`, `#"..."#`, ...
    fn raw_string(&mut self) {
        let mut hashes = 0;
        while self.peek(0) == Some('#') {
            hashes += 1;
            self.bump();
        }
        self.bump(); // the opening quote
        while let Some(c) = self.peek(0) {
            self.bump();
            if c == '"' && (0..hashes).all(|i| self.peek(i) == Some('#')) {
                for _ in 0..hashes {
                    self.bump();
                }
                return;
            }
        }
    }

    /// From a `'`: a char literal (`'{'`, `'\''`, `'\u{7b}'`) or a
    /// lifetime or label (`'a`, `'static`), which has no closing quote.
    fn quote(&mut self) {
        self.bump();
        if self.peek(0) == Some('\\') {
            self.bump();
            self.bump();
            while self.peek(0).is_some_and(|c| c != '\'') {
                self.bump();
            }
            self.bump();
        } else if self.peek(1) == Some('\'') {
            self.bump();
            self.bump();
        } else {
            while self
                .peek(0)
                .is_some_and(|c| c == '_' || c.is_alphanumeric())
            {
                self.bump();
            }
        }
    }

    /// An identifier, keyword or number (a number is read like an
    /// identifier: it is never `fn`).
    fn ident(&mut self) -> String {
        let start = self.pos;
        while self
            .peek(0)
            .is_some_and(|c| c == '_' || c.is_alphanumeric())
        {
            self.bump();
        }
        self.chars[start..self.pos].iter().collect()
    }

    /// After the identifier `ident`: when it is the prefix of a literal
    /// (`b"..."`, `c"..."`, `r"..."`, `r#"..."#`, `br#"..."#`, `b'{'`),
    /// reads the literal and returns true.
    fn literal_after_prefix(&mut self, ident: &str) -> bool {
        match (ident, self.peek(0)) {
            ("b" | "c", Some('"')) => self.string(),
            ("b", Some('\'')) => self.quote(),
            ("r" | "br" | "cr", Some('"')) => self.raw_string(),
            ("r" | "br" | "cr", Some('#')) if self.raw_string_ahead() => self.raw_string(),
            _ => return false,
        }
        true
    }

    /// After `r`: whether a raw identifier (`r#fn`) follows.
    fn raw_ident_ahead(&self) -> bool {
        self.peek(0) == Some('#') && self.peek(1).is_some_and(|c| c == '_' || c.is_alphabetic())
    }

    /// At `#`s after `r`: whether a quote follows them (a raw string, not
    /// a raw identifier like `r#fn`).
    fn raw_string_ahead(&self) -> bool {
        let mut i = 0;
        while self.peek(i) == Some('#') {
            i += 1;
        }
        self.peek(i) == Some('"')
    }
}

/// Every function with a body in `source`, in the order their bodies
/// close (a nested function before the function around it). Items marked
/// `#[cfg(test)]` are skipped.
pub fn functions(source: &str) -> Vec<Function> {
    let tokens = tokens(source);
    let mut found = vec![];
    // Functions whose bodies are open: (name, fn line, brace depth inside).
    let mut open: Vec<(String, usize, usize)> = vec![];
    let mut depth = 0;
    let mut i = 0;
    while i < tokens.len() {
        if is_cfg_test(&tokens[i..]) {
            i = skip_item(&tokens, i);
            continue;
        }
        match &tokens[i] {
            (Token::Ident(kw), line) if kw == "fn" => {
                // `fn name`: an item; `fn(` is a function pointer type.
                if let Some((Token::Ident(name), _)) = tokens.get(i + 1)
                    && let Some(body) = body_start(&tokens, i + 2)
                {
                    depth += 1;
                    open.push((name.clone(), *line, depth));
                    i = body + 1;
                    continue;
                }
            }
            (Token::Punct('{'), _) => depth += 1,
            (Token::Punct('}'), line) => {
                if let Some((name, start, _)) = open.pop_if(|(_, _, d)| *d == depth) {
                    found.push(Function {
                        name,
                        line: start,
                        lines: line - start + 1,
                    });
                }
                depth -= 1;
            }
            _ => {}
        }
        i += 1;
    }
    found
}

/// From just after `fn name`: the index of the body's `{`, or None for a
/// declaration (`;` first). Parentheses and brackets are skipped, for the
/// `;` of `[u8; 4]` in a signature.
fn body_start(tokens: &[(Token, usize)], from: usize) -> Option<usize> {
    let mut nesting = 0usize;
    for (i, (token, _)) in tokens.iter().enumerate().skip(from) {
        match token {
            Token::Punct('(' | '[') => nesting += 1,
            Token::Punct(')' | ']') => nesting = nesting.saturating_sub(1),
            Token::Punct(';') if nesting == 0 => return None,
            Token::Punct('{') if nesting == 0 => return Some(i),
            _ => {}
        }
    }
    None
}

/// Whether `tokens` start with `#[cfg(test)]`.
fn is_cfg_test(tokens: &[(Token, usize)]) -> bool {
    let want = [
        Token::Punct('#'),
        Token::Punct('['),
        Token::Ident("cfg".into()),
        Token::Punct('('),
        Token::Ident("test".into()),
        Token::Punct(')'),
        Token::Punct(']'),
    ];
    tokens.len() >= want.len() && tokens.iter().zip(&want).all(|((t, _), w)| t == w)
}

/// From an attribute: the index just after the item it marks, whether
/// the item ends with `;` (`mod tests;`, `use ...;`) or a `{ ... }` block
/// (`mod tests { ... }`, `fn`, `impl`).
fn skip_item(tokens: &[(Token, usize)], from: usize) -> usize {
    let mut nesting = 0usize;
    let mut i = from;
    // The attributes: `#[...]` groups, brackets balanced.
    while tokens.get(i).is_some_and(|(t, _)| *t == Token::Punct('#')) {
        i += 1;
        for (token, _) in &tokens[i..] {
            i += 1;
            match token {
                Token::Punct('[') => nesting += 1,
                Token::Punct(']') => {
                    nesting -= 1;
                    if nesting == 0 {
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    while let Some((token, _)) = tokens.get(i) {
        i += 1;
        match token {
            Token::Punct('(' | '[' | '{') => nesting += 1,
            Token::Punct(')' | ']') => nesting = nesting.saturating_sub(1),
            Token::Punct('}') => {
                nesting = nesting.saturating_sub(1);
                if nesting == 0 {
                    return i;
                }
            }
            Token::Punct(';') if nesting == 0 => return i,
            _ => {}
        }
    }
    i
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn lengths(source: &str) -> Vec<(String, usize, usize)> {
        functions(source)
            .into_iter()
            .map(|f| (f.name, f.line, f.lines))
            .collect()
    }

    #[test]
    fn braces_in_strings_comments_and_chars_are_text() {
        let source = r####"
fn tricky() {
    let a = "}}}";
    let b = r"}";
    let c = r#"a "quoted" } brace"#;
    let d = br##"}"# still in"##;
    let e = b"}";
    let f = '}';
    let g = '\'';
    let h = '\u{7d}';
    let i = b'{';
    // }
    /* } /* nested } */ } */
    /// }
    let s: &'static str = "\"}";
    'outer: loop { break 'outer; }
}
fn after() {}
"####;
        assert_eq!(
            lengths(source),
            vec![("tricky".into(), 2, 16), ("after".into(), 18, 1)]
        );
    }

    #[test]
    fn nested_functions_and_methods_count_each() {
        let source = "\
impl S {
    pub(crate) async fn outer(&self) -> u8 {
        const fn inner(x: [u8; 2]) -> u8 {
            x[0]
        }
        inner([1, 2])
    }
    pub unsafe extern \"C\" fn ffi() {}
}
";
        assert_eq!(
            lengths(source),
            vec![
                ("inner".into(), 3, 3),
                ("outer".into(), 2, 6),
                ("ffi".into(), 8, 1)
            ]
        );
    }

    #[test]
    fn declarations_and_fn_pointers_are_not_functions() {
        let source = "\
trait T {
    fn f(&self);
    fn g(&self) -> [u8; 4];
    fn h(&self) {
    }
}
struct S { f: fn(u8) -> u8 }
fn r#fn() {}
";
        assert_eq!(
            lengths(source),
            vec![("h".into(), 4, 2), ("r#fn".into(), 8, 1)]
        );
    }

    #[test]
    fn test_items_are_skipped() {
        let source = "\
fn product() {}
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    fn helper() {}
    #[test]
    fn case() {}
}
#[cfg(test)]
mod more;
fn last() {}
";
        assert_eq!(
            lengths(source),
            vec![("product".into(), 1, 1), ("last".into(), 11, 1)]
        );
    }

    /// `fn name` at line 1, `n` lines in all.
    fn long_fn(name: &str, n: usize) -> String {
        let mut s = format!("fn {name}() {{\n");
        for _ in 0..n - 2 {
            s.push_str("    let _ = \"{\";\n");
        }
        s.push_str("}\n");
        s
    }

    #[test]
    fn a_long_function_is_detected() {
        let source = format!("{}{}", long_fn("ok", 120), long_fn("long", 121));
        assert_eq!(
            lengths(&source),
            vec![("ok".into(), 1, 120), ("long".into(), 121, 121)]
        );
    }

    #[test]
    fn scan_reports_a_long_function_in_a_tree() {
        let root = std::env::temp_dir().join(format!("xtask-fn-length-{}", std::process::id()));
        let src = root.join("crate/src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("lib.rs"), long_fn("short", 10)).unwrap();
        std::fs::write(src.join("sub/deep.rs"), long_fn("long", 121)).unwrap();
        std::fs::write(src.join("notes.txt"), long_fn("text", 200)).unwrap();
        let found = scan(&root, &[src], MAX_LINES);
        std::fs::remove_dir_all(&root).unwrap();
        let found: Vec<String> = found.unwrap().iter().map(ToString::to_string).collect();
        assert_eq!(
            found,
            vec!["crate/src/sub/deep.rs:1 fn long: 121 lines (max 120)"]
        );
    }

    #[test]
    fn the_scanned_directories_exist() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        for dir in DIRS {
            assert!(root.join(dir).is_dir(), "{dir} is not a directory");
        }
    }
}
