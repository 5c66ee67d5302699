//! The docs do not lie: README.md and docs/*.md are checked against the repository and the
//! built binary.
//!
//! - **Links**: every relative Markdown link (`[text](path#anchor)`, `![alt](path)`,
//!   `[ref]: path`) points at a file or folder that exists, and every `#anchor` at a heading
//!   of the target page, by GitHub's slug rules: the heading's text (inline code and links
//!   reduced to their text), lowercased, every character but letters, digits, `-`, `_` and
//!   spaces dropped, spaces turned into `-`; the second heading with the same slug gets `-1`,
//!   the third `-2`. Links inside code are not links.
//! - **Commands**: every `sluice` command line shown, in a code block or in an inline code
//!   span that starts with `sluice `, names a subcommand that `sluice --help` lists, and only
//!   options (`--long`, `-s`) that `sluice --help` and `sluice <subcommand> --help` list; a
//!   word after the subcommand must be the value of an option (sluice's subcommands take no
//!   positional arguments). In a command line the invocation starts at the last word
//!   `sluice` (or a path ending in `/sluice`) that is followed by a subcommand-like word or an
//!   option, so `docker run --name sluice … sluice run` checks `run`, and `docker stop
//!   sluice` checks nothing; `cargo run … -- ARGS` is an invocation of `ARGS`. Square
//!   brackets of a usage line (`[--config PATH]`) are ignored; a shell comment (` # …`) ends
//!   the line; `|`, `&&`, `;` and `&` separate commands.
//! - **Paths**: every word in backticks (its first word) and every word of a code block that
//!   starts with `src/`, `tests/`, `bench/`, `deploy/`, `config/`, `docs/`, `fuzz/` or
//!   `.ci/`, or is `Dockerfile`, exists in the repository (a trailing `:LINE` is dropped;
//!   words with `*`, `<`, `{` or `$` are patterns, not paths, and are skipped).
//! - **TOML**: every code block marked ```` ```toml ```` is a whole config that
//!   `sluice check` accepts. A block that shows only part of a config is marked
//!   ```` ```toml fragment ```` and is skipped; any other word after `toml` is an error.
//! - **README.md** is at most [`README_MAX_LINES`] lines: the five-minute page; the
//!   reference lives in docs/.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The README is the page a newcomer reads in five minutes.
const README_MAX_LINES: usize = 250;

/// Words that name a repository path when they start with one of these.
const PATH_PREFIXES: &[&str] = &[
    "src/", "tests/", "bench/", "deploy/", "config/", "docs/", "fuzz/", ".ci/",
];

/// Repository paths named by a bare word.
const PATH_WORDS: &[&str] = &["Dockerfile"];

/// The info-string marker of a TOML block that is only part of a config.
const TOML_FRAGMENT: &str = "fragment";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One Markdown page, by its path relative to the repository root.
struct Page {
    path: PathBuf,
    text: String,
}

/// README.md and every docs/*.md, in a stable order.
fn pages() -> Vec<Page> {
    let mut paths = vec![PathBuf::from("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("read docs/")
        .map(|entry| entry.expect("a docs/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .map(|path| Path::new("docs").join(path.file_name().unwrap()))
        .collect();
    docs.sort();
    paths.extend(docs);
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(root().join(&path))
                .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            Page { path, text }
        })
        .collect()
}

/// A fenced code block: its info string, its lines and the line its fence opens on.
struct CodeBlock {
    info: String,
    body: String,
    line: usize,
}

/// A paragraph of prose (consecutive non-blank lines outside code blocks).
struct Paragraph {
    text: String,
    line: usize,
}

/// A page split into code blocks and prose paragraphs (1-based line numbers).
struct Parsed {
    blocks: Vec<CodeBlock>,
    paragraphs: Vec<Paragraph>,
}

/// The fence a line opens or closes with: its character and length, and the rest of the line.
fn fence(line: &str) -> Option<(char, usize, &str)> {
    let indent = line.len() - line.trim_start_matches(' ').len();
    if indent > 3 {
        return None;
    }
    let rest = &line[indent..];
    let c = rest.chars().next().filter(|c| *c == '`' || *c == '~')?;
    let n = rest.chars().take_while(|x| *x == c).count();
    (n >= 3).then(|| (c, n, rest[n..].trim()))
}

fn parse(text: &str) -> Parsed {
    let mut blocks = Vec::new();
    let mut paragraphs = Vec::new();
    let mut open: Option<(char, usize, CodeBlock)> = None;
    let mut paragraph: Option<Paragraph> = None;
    for (i, line) in text.lines().enumerate() {
        let number = i + 1;
        if let Some((c, n, block)) = &mut open {
            match fence(line) {
                Some((c2, n2, rest)) if c2 == *c && n2 >= *n && rest.is_empty() => {
                    blocks.push(open.take().unwrap().2);
                }
                _ => {
                    block.body.push_str(line);
                    block.body.push('\n');
                }
            }
            continue;
        }
        if let Some((c, n, info)) = fence(line) {
            paragraphs.extend(paragraph.take());
            let block = CodeBlock {
                info: info.to_string(),
                body: String::new(),
                line: number,
            };
            open = Some((c, n, block));
            continue;
        }
        if line.trim().is_empty() {
            paragraphs.extend(paragraph.take());
            continue;
        }
        match &mut paragraph {
            Some(p) => {
                p.text.push('\n');
                p.text.push_str(line);
            }
            None => {
                paragraph = Some(Paragraph {
                    text: line.to_string(),
                    line: number,
                })
            }
        }
    }
    paragraphs.extend(paragraph);
    if let Some((_, _, block)) = open {
        blocks.push(block); // an unclosed fence runs to the end of the page
    }
    Parsed { blocks, paragraphs }
}

/// The inline code spans of a paragraph, and the paragraph with each span blanked out.
fn code_spans(text: &str) -> (Vec<String>, String) {
    let chars: Vec<char> = text.chars().collect();
    let mut spans = Vec::new();
    let mut prose = String::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '`' {
            prose.push(chars[i]);
            i += 1;
            continue;
        }
        let n = chars[i..].iter().take_while(|c| **c == '`').count();
        // The closing run has exactly n backticks.
        let mut j = i + n;
        let mut close = None;
        while j < chars.len() {
            if chars[j] == '`' {
                let m = chars[j..].iter().take_while(|c| **c == '`').count();
                if m == n {
                    close = Some(j);
                    break;
                }
                j += m;
            } else {
                j += 1;
            }
        }
        match close {
            Some(j) => {
                let span: String = chars[i + n..j].iter().collect();
                spans.push(span.replace('\n', " ").trim().to_string());
                prose.push(' ');
                i = j + n;
            }
            None => {
                // A lone run of backticks is literal text.
                prose.extend(&chars[i..i + n]);
                i += n;
            }
        }
    }
    (spans, prose)
}

/// Whether a code block holds shell-like lines (not data: TOML, JSON).
fn is_data(block: &CodeBlock) -> bool {
    let lang = block.info.split_whitespace().next().unwrap_or("");
    matches!(lang, "toml" | "json")
}

// ----- links and anchors -----

/// GitHub's anchor for a heading's text.
fn slug(heading: &str) -> String {
    // Inline links and images read as their text.
    let mut text = String::new();
    let mut rest = heading;
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find("](").map(|c| open + c) else {
            break;
        };
        let Some(end) = rest[close..].find(')').map(|e| close + e) else {
            break;
        };
        text.push_str(&rest[..open]);
        text.push_str(&rest[open + 1..close]);
        rest = &rest[end + 1..];
    }
    text.push_str(rest);
    text.to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a page: one per heading (duplicates numbered), plus HTML `id`/`name`s.
fn anchors(text: &str) -> BTreeSet<String> {
    let parsed = parse(text);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut anchors = BTreeSet::new();
    for paragraph in &parsed.paragraphs {
        for line in paragraph.text.lines() {
            if let Some(heading) = heading(line) {
                let base = slug(&heading);
                let n = seen.entry(base.clone()).or_insert(0);
                anchors.insert(if *n == 0 {
                    base.clone()
                } else {
                    format!("{base}-{n}")
                });
                *n += 1;
            }
            for attr in ["id=\"", "name=\""] {
                for (at, _) in line.match_indices(&format!("<a {attr}")) {
                    let value = &line[at + 3 + attr.len()..];
                    if let Some(end) = value.find('"') {
                        anchors.insert(value[..end].to_string());
                    }
                }
            }
        }
    }
    anchors
}

/// The text of an ATX heading line, as rendered (inline code reduced to its text).
fn heading(line: &str) -> Option<String> {
    let indent = line.len() - line.trim_start_matches(' ').len();
    if indent > 3 {
        return None;
    }
    let rest = &line[indent..];
    let level = rest.chars().take_while(|c| *c == '#').count();
    if !(1..=6).contains(&level) {
        return None;
    }
    let text = &rest[level..];
    if !(text.is_empty() || text.starts_with(' ') || text.starts_with('\t')) {
        return None;
    }
    // An optional closing run of #s.
    let text = text.trim();
    let text = match text.trim_end_matches('#') {
        t if t.is_empty() || t.ends_with(' ') => t.trim_end(),
        _ => text,
    };
    // Inline code reads as its text: backticks are only delimiters.
    let rendered = text.replace('`', "");
    Some(rendered.replace('*', ""))
}

/// The targets of the links in a paragraph's prose (code spans already blanked out).
fn link_targets(prose: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut rest = prose;
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        // Up to the matching parenthesis.
        let mut depth = 0usize;
        let mut end = after.len();
        for (i, c) in after.char_indices() {
            match c {
                '(' => depth += 1,
                ')' if depth == 0 => {
                    end = i;
                    break;
                }
                ')' => depth -= 1,
                _ => {}
            }
        }
        let inside = after[..end].trim();
        // `(<path>)` and `(path "title")`.
        let target = inside
            .strip_prefix('<')
            .and_then(|t| t.split('>').next())
            .unwrap_or_else(|| inside.split_whitespace().next().unwrap_or(""));
        targets.push(target.to_string());
        rest = &after[end.min(after.len())..];
    }
    // Reference definitions: `[label]: target`.
    for line in prose.lines() {
        let line = line.trim_start();
        if let Some(close) = line.strip_prefix('[').and_then(|l| l.find("]:")) {
            if let Some(target) = line[close + 3..].split_whitespace().next() {
                targets.push(target.to_string());
            }
        }
    }
    targets
}

/// `a/b/../c` → `a/c`, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[test]
fn every_relative_link_and_anchor_leads_somewhere() {
    let pages = pages();
    let mut problems = Vec::new();
    for page in &pages {
        let dir = page.path.parent().unwrap_or(Path::new(""));
        for paragraph in parse(&page.text).paragraphs {
            let (_, prose) = code_spans(&paragraph.text);
            for target in link_targets(&prose) {
                let at = format!("{}:{}", page.path.display(), paragraph.line);
                if target.is_empty() {
                    problems.push(format!("{at}: an empty link target"));
                    continue;
                }
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                let (file, anchor) = match target.split_once('#') {
                    Some((file, anchor)) => (file, Some(anchor)),
                    None => (target.as_str(), None),
                };
                if file.starts_with('/') {
                    problems.push(format!(
                        "{at}: {target}: an absolute path; links are relative to the page"
                    ));
                    continue;
                }
                let resolved = if file.is_empty() {
                    page.path.clone()
                } else {
                    normalize(&dir.join(file))
                };
                let full = root().join(&resolved);
                if !full.exists() {
                    problems.push(format!(
                        "{at}: {target}: {} does not exist",
                        resolved.display()
                    ));
                    continue;
                }
                let Some(anchor) = anchor else { continue };
                if resolved.extension().is_none_or(|ext| ext != "md") {
                    problems.push(format!(
                        "{at}: {target}: an anchor into a file that is not Markdown"
                    ));
                    continue;
                }
                let text = std::fs::read_to_string(&full).expect("read a link target");
                let known = anchors(&text);
                if !known.contains(anchor) {
                    problems.push(format!(
                        "{at}: {target}: no heading of {} has the anchor #{anchor} (it has: {})",
                        resolved.display(),
                        known.iter().cloned().collect::<Vec<_>>().join(", ")
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "links that lead nowhere:\n{}",
        problems.join("\n")
    );
}

// ----- commands and options -----

/// What `sluice [SUBCOMMAND] --help` says: its options (long and short names, and whether
/// each takes a value), its subcommands, and whether it takes positional arguments.
#[derive(Debug, Default)]
struct Help {
    options: BTreeMap<String, bool>,
    subcommands: BTreeSet<String>,
    positionals: bool,
}

fn sluice_help(subcommand: Option<&str>) -> Help {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command.env_remove("SLUICE_LOG").env_remove("SLUICE_CONFIG");
    command.args(subcommand).arg("--help");
    let output = command.output().expect("run sluice --help");
    assert!(
        output.status.success(),
        "sluice {} --help failed: {}",
        subcommand.unwrap_or(""),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("help is UTF-8");
    let mut help = Help::default();
    let mut section = "";
    for line in text.lines() {
        if let Some(usage) = line.strip_prefix("Usage: ") {
            // `sluice run [OPTIONS]`: anything past the options and the subcommand is a
            // positional argument.
            help.positionals = usage
                .split_whitespace()
                .skip(1 + usize::from(subcommand.is_some()))
                .any(|word| word != "[OPTIONS]" && word != "<COMMAND>");
            continue;
        }
        if !line.starts_with(' ') && line.ends_with(':') {
            section = line;
            continue;
        }
        let entry = line.trim_start();
        let indent = line.len() - entry.len();
        if !(1..=6).contains(&indent) {
            continue; // a description line
        }
        match section {
            "Commands:" => {
                if let Some(name) = entry.split_whitespace().next() {
                    help.subcommands.insert(name.to_string());
                }
            }
            "Options:" if entry.starts_with('-') => {
                let takes_value = entry.contains(" <");
                for name in entry.split([',', ' ']).filter(|w| w.starts_with('-')) {
                    help.options.insert(name.to_string(), takes_value);
                }
            }
            _ => {}
        }
    }
    help
}

/// `sluice --help` and each subcommand's, run once.
fn helps() -> &'static (Help, BTreeMap<String, Help>) {
    static HELPS: OnceLock<(Help, BTreeMap<String, Help>)> = OnceLock::new();
    HELPS.get_or_init(|| {
        let top = sluice_help(None);
        assert!(
            !top.subcommands.is_empty() && top.options.contains_key("--log-format"),
            "sluice --help did not parse: {top:?}"
        );
        let subs = top
            .subcommands
            .iter()
            .filter(|name| *name != "help")
            .map(|name| (name.clone(), sluice_help(Some(name))))
            .collect();
        (top, subs)
    })
}

/// Command lines of a code block: continuation lines joined, comments dropped.
fn command_lines(body: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in body.lines() {
        let line = strip_comment(line);
        match line.trim_end().strip_suffix('\\') {
            Some(start) => {
                current.push_str(start);
                current.push(' ');
            }
            None => {
                current.push_str(&line);
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    if !current.is_empty() {
        lines.push(current);
    }
    lines
}

/// A line without its shell comment (a `#` at the start of a word).
fn strip_comment(line: &str) -> String {
    let mut previous = ' ';
    for (i, c) in line.char_indices() {
        if c == '#' && previous.is_whitespace() {
            return line[..i].to_string();
        }
        previous = c;
    }
    line.to_string()
}

/// The arguments of each sluice invocation on a command line.
fn invocations(line: &str) -> Vec<Vec<String>> {
    let words: Vec<String> = line
        .split_whitespace()
        .map(|word| word.replace(['[', ']'], ""))
        .filter(|word| !word.is_empty())
        .collect();
    let mut found = Vec::new();
    for command in words.split(|w| matches!(w.as_str(), "|" | "||" | "&&" | ";" | "&")) {
        let is_sluice = |w: &str| w == "sluice" || w.ends_with("/sluice");
        let starts_args = |w: &str| {
            w.starts_with('-')
                || (w.starts_with(|c: char| c.is_ascii_lowercase())
                    && w.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
        };
        let cargo_run = command
            .windows(2)
            .position(|w| w[0] == "cargo" && w[1] == "run");
        let args_from = if let Some(at) = cargo_run {
            command[at..]
                .iter()
                .position(|w| w == "--")
                .map(|dash| at + dash + 1)
        } else {
            (0..command.len())
                .rev()
                .find(|&i| {
                    is_sluice(&command[i]) && command.get(i + 1).is_some_and(|w| starts_args(w))
                })
                .map(|i| i + 1)
        };
        if let Some(from) = args_from {
            let args = command[from..]
                .iter()
                .take_while(|w| !w.starts_with('>') && !w.starts_with("2>"))
                .cloned()
                .collect();
            found.push(args);
        }
    }
    found
}

/// What is wrong with `sluice ARGS`, if anything.
fn check_invocation(args: &[String]) -> Vec<String> {
    let (top, subs) = helps();
    let mut problems = Vec::new();
    let mut help = top;
    let mut subcommand: Option<&str> = None;
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg.starts_with('-') && arg.len() > 1 {
            let name = arg.split('=').next().unwrap();
            match help.options.get(name) {
                Some(&takes_value) => {
                    if takes_value && !arg.contains('=') {
                        i += 1; // its value
                    }
                }
                None => {
                    problems.push(format!(
                        "`{name}` is not an option of `sluice{}` (it has: {})",
                        subcommand.map(|s| format!(" {s}")).unwrap_or_default(),
                        help.options.keys().cloned().collect::<Vec<_>>().join(", ")
                    ));
                    // Whether it would take a value is unknown: a word after it is taken as
                    // its value rather than reported too.
                    if args.get(i).is_some_and(|next| !next.starts_with('-')) {
                        i += 1;
                    }
                }
            }
            continue;
        }
        match subcommand {
            None => match subs.get(arg.as_str()) {
                Some(sub) => {
                    subcommand = Some(arg);
                    help = sub;
                }
                None => {
                    problems.push(format!(
                        "`sluice {arg}`: no such subcommand (sluice has: {})",
                        subs.keys().cloned().collect::<Vec<_>>().join(", ")
                    ));
                    break;
                }
            },
            Some(sub) if !help.positionals => problems.push(format!(
                "`sluice {sub}` takes no argument `{arg}` (only options; a value belongs to \
                 the option before it)"
            )),
            Some(_) => {}
        }
    }
    if subcommand.is_none() && problems.is_empty() && !args.iter().any(|a| a == "--help") {
        problems.push("a sluice invocation without a subcommand".to_string());
    }
    problems
}

#[test]
fn every_sluice_command_and_option_shown_exists() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let parsed = parse(&page.text);
        let mut lines: Vec<(usize, String)> = Vec::new();
        for block in parsed.blocks.iter().filter(|b| !is_data(b)) {
            for line in command_lines(&block.body) {
                lines.push((block.line, line));
            }
        }
        for paragraph in &parsed.paragraphs {
            let (spans, _) = code_spans(&paragraph.text);
            for span in spans.into_iter().filter(|s| s.starts_with("sluice ")) {
                lines.push((paragraph.line, span));
            }
        }
        for (line_number, line) in lines {
            for args in invocations(&line) {
                checked += 1;
                for problem in check_invocation(&args) {
                    problems.push(format!(
                        "{}:{line_number}: `{}`: {problem}",
                        page.path.display(),
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(checked > 0, "no sluice command found in the docs");
    assert!(
        problems.is_empty(),
        "commands that sluice does not have:\n{}",
        problems.join("\n")
    );
}

// ----- repository paths -----

/// The repository path a word names, if it names one.
fn repository_path(word: &str) -> Option<String> {
    let word = word.trim_start_matches(['\'', '"', '(', '[', '<']);
    let word = word.trim_end_matches(['\'', '"', '(', ')', '[', ']', '>', ',', ';', ':', '.']);
    let word = match word.rsplit_once(':') {
        Some((path, line)) if line.chars().all(|c| c.is_ascii_digit()) => path,
        _ => word,
    };
    if word.contains(['*', '<', '{', '$']) {
        return None;
    }
    let named = PATH_PREFIXES.iter().any(|p| word.starts_with(p)) || PATH_WORDS.contains(&word);
    named.then(|| word.to_string())
}

#[test]
fn every_repository_path_named_exists() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let parsed = parse(&page.text);
        let mut words: Vec<(usize, String)> = Vec::new();
        for paragraph in &parsed.paragraphs {
            let (spans, _) = code_spans(&paragraph.text);
            for span in spans {
                if let Some(first) = span.split_whitespace().next() {
                    words.push((paragraph.line, first.to_string()));
                }
            }
        }
        for block in parsed.blocks.iter().filter(|b| !is_data(b)) {
            for (i, line) in block.body.lines().enumerate() {
                for word in line.split_whitespace() {
                    words.push((block.line + 1 + i, word.to_string()));
                }
            }
        }
        for (line, word) in words {
            let Some(path) = repository_path(&word) else {
                continue;
            };
            checked += 1;
            if !root().join(&path).exists() {
                problems.push(format!(
                    "{}:{line}: `{path}` does not exist in the repository",
                    page.path.display()
                ));
            }
        }
    }
    assert!(checked > 0, "no repository path found in the docs");
    assert!(
        problems.is_empty(),
        "paths that do not exist:\n{}",
        problems.join("\n")
    );
}

// ----- TOML examples -----

#[test]
fn every_complete_toml_example_passes_sluice_check() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("docs-toml");
    std::fs::create_dir_all(&dir).expect("create the temp dir");
    let mut problems = Vec::new();
    for page in pages() {
        for block in parse(&page.text).blocks {
            let mut info = block.info.split_whitespace();
            if info.next() != Some("toml") {
                continue;
            }
            let at = format!("{}:{}", page.path.display(), block.line);
            match info.collect::<Vec<_>>().as_slice() {
                [] => {}
                [TOML_FRAGMENT] => continue,
                other => {
                    problems.push(format!(
                        "{at}: ```toml {}: mark a part of a config ```toml {TOML_FRAGMENT}",
                        other.join(" ")
                    ));
                    continue;
                }
            }
            let name = page.path.to_string_lossy().replace(['/', '.'], "-");
            let file = dir.join(format!("{name}-{}.toml", block.line));
            std::fs::write(&file, &block.body).expect("write a temp config");
            let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
                .env_remove("SLUICE_LOG")
                .env_remove("SLUICE_CONFIG")
                .arg("check")
                .arg("--config")
                .arg(&file)
                .output()
                .expect("run sluice check");
            if !output.status.success() {
                problems.push(format!(
                    "{at}: sluice check refuses this block (mark a part of a config ```toml \
                     {TOML_FRAGMENT}):\n{}",
                    String::from_utf8_lossy(&output.stderr).trim()
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "TOML examples that are not valid configs:\n{}",
        problems.join("\n")
    );
}

// ----- the README -----

#[test]
fn the_readme_is_a_five_minute_page() {
    let text = std::fs::read_to_string(root().join("README.md")).expect("read README.md");
    let lines = text.lines().count();
    assert!(
        lines <= README_MAX_LINES,
        "README.md has {lines} lines; at most {README_MAX_LINES}: move the reference to docs/"
    );
}

// ----- the checker itself -----

#[test]
fn slugs_follow_github() {
    assert_eq!(slug("HTTP behaviour"), "http-behaviour");
    assert_eq!(
        heading("### `[service.rate_limit]`").map(|h| slug(&h)),
        Some("servicerate_limit".to_string())
    );
    assert_eq!(
        heading("### `[service.autoscale]` (optional; resources opt in with `autoscale = true`)")
            .map(|h| slug(&h)),
        Some("serviceautoscale-optional-resources-opt-in-with-autoscale--true".to_string())
    );
    let twice = anchors("# Limits\n\n## Limits\n\n```\n# not a heading\n```\n### Limits\n");
    assert_eq!(
        twice,
        ["limits", "limits-1", "limits-2"]
            .map(String::from)
            .into_iter()
            .collect()
    );
}

#[test]
fn invocations_are_found_where_sluice_runs() {
    let args = |line: &str| invocations(line);
    assert_eq!(
        args("docker run -d --name sluice -p 8080:8080 --read-only sluice run"),
        vec![vec!["run".to_string()]]
    );
    assert_eq!(
        args("docker exec sluice sluice check"),
        vec![vec!["check".to_string()]]
    );
    assert!(args("docker stop sluice").is_empty());
    assert!(args("docker build -t sluice .").is_empty());
    assert_eq!(
        args("cargo run --release -- demo --latency 5ms"),
        vec![vec!["demo", "--latency", "5ms"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()]
    );
    assert_eq!(
        args("sluice run [--config PATH] [--workers N]"),
        vec![vec!["run", "--config", "PATH", "--workers", "N"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()]
    );
}
