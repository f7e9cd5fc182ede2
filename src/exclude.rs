//! `exclude:` globs (configuration file and `--exclude GLOB`): databases that are never
//! captured nor shipped.
//!
//! Syntax (a pattern is matched against a database's path relative to the mount root, with
//! `/` between components):
//! - `*` matches any run of characters within one component (never a `/`);
//! - `?` matches one character other than `/`;
//! - `[abc]`, `[a-z]`, `[!a-z]` match one character of (or, with `!`, not of) a class;
//! - `**` as a whole component matches any number of components, none included
//!   (`**/cache.db`: at any depth; `tenants/**/tmp-*.db`);
//! - `\c` matches the character `c` itself.
//!
//! A pattern also matches everything under a directory it matches: `scratch` and `scratch/**`
//! both exclude `scratch/a.db`. Patterns are relative: a leading `/`, an empty component or a
//! `..` component is refused when the configuration is read.

use std::fmt;

/// A list of exclude patterns, checked once when read.
#[derive(Clone, Default)]
pub struct Exclude {
    pats: Vec<Pattern>,
}

#[derive(Clone)]
struct Pattern {
    text: String,
    comps: Vec<Comp>,
}

#[derive(Clone)]
enum Comp {
    /// `**`: any number of components.
    Any,
    Glob(Vec<Tok>),
}

#[derive(Clone)]
enum Tok {
    Lit(char),
    /// `?`
    One,
    /// `*`
    Star,
    /// `[...]`: ranges (inclusive), negated.
    Class(Vec<(char, char)>, bool),
}

impl fmt::Debug for Exclude {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.pats.iter().map(|p| &p.text))
            .finish()
    }
}

impl Exclude {
    /// Parses every pattern; the error names the pattern and what is wrong with it.
    pub fn new<S: AsRef<str>>(pats: &[S]) -> Result<Exclude, String> {
        let pats = pats
            .iter()
            .map(|p| {
                parse(p.as_ref()).map_err(|e| format!("exclude pattern {:?}: {e}", p.as_ref()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Exclude { pats })
    }

    pub fn is_empty(&self) -> bool {
        self.pats.is_empty()
    }

    /// The patterns as written.
    pub fn patterns(&self) -> Vec<String> {
        self.pats.iter().map(|p| p.text.clone()).collect()
    }

    /// True if `rel` (a path relative to the mount root) or a directory above it matches a
    /// pattern.
    pub fn matches(&self, rel: &str) -> bool {
        if self.pats.is_empty() {
            return false;
        }
        let parts: Vec<&str> = rel.split('/').filter(|c| !c.is_empty()).collect();
        self.pats
            .iter()
            .any(|p| (1..=parts.len()).any(|n| match_comps(&p.comps, &parts[..n])))
    }
}

fn parse(text: &str) -> Result<Pattern, String> {
    if text.is_empty() {
        return Err("empty".into());
    }
    if text.starts_with('/') {
        return Err("patterns are relative to the mount root: remove the leading /".into());
    }
    let body = text.strip_suffix('/').unwrap_or(text);
    let mut comps = Vec::new();
    for c in body.split('/') {
        match c {
            "" => return Err("empty path component (//)".into()),
            ".." | "." => return Err(format!("{c} is not allowed as a component")),
            "**" => comps.push(Comp::Any),
            _ => comps.push(Comp::Glob(tokens(c)?)),
        }
    }
    Ok(Pattern {
        text: text.to_string(),
        comps,
    })
}

fn tokens(c: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut it = c.chars().peekable();
    while let Some(ch) = it.next() {
        match ch {
            '*' => {
                if it.peek() == Some(&'*') {
                    return Err("** must be a whole path component (a/**/b)".into());
                }
                out.push(Tok::Star)
            }
            '?' => out.push(Tok::One),
            '\\' => out.push(Tok::Lit(it.next().ok_or("trailing \\")?)),
            '[' => {
                let neg = it.next_if_eq(&'!').is_some();
                let mut ranges = Vec::new();
                let mut first = true;
                loop {
                    let Some(a) = it.next() else {
                        return Err("unterminated [".into());
                    };
                    if a == ']' && !first {
                        break;
                    }
                    first = false;
                    let a = if a == '\\' {
                        it.next().ok_or("unterminated [")?
                    } else {
                        a
                    };
                    if it.peek() == Some(&'-') {
                        it.next();
                        match it.next() {
                            Some(']') => {
                                ranges.push((a, a));
                                ranges.push(('-', '-'));
                                break;
                            }
                            Some(b) if b >= a => ranges.push((a, b)),
                            Some(b) => return Err(format!("empty range {a}-{b}")),
                            None => return Err("unterminated [".into()),
                        }
                    } else {
                        ranges.push((a, a));
                    }
                }
                out.push(Tok::Class(ranges, neg));
            }
            _ => out.push(Tok::Lit(ch)),
        }
    }
    Ok(out)
}

fn match_comps(p: &[Comp], parts: &[&str]) -> bool {
    match p.split_first() {
        None => parts.is_empty(),
        Some((Comp::Any, rest)) => (0..=parts.len()).any(|i| match_comps(rest, &parts[i..])),
        Some((Comp::Glob(t), rest)) => match parts.split_first() {
            Some((c, more)) => {
                let cs: Vec<char> = c.chars().collect();
                match_toks(t, &cs) && match_comps(rest, more)
            }
            None => false,
        },
    }
}

/// Wildcard match of one component (iterative, backtracking to the last `*`).
fn match_toks(t: &[Tok], s: &[char]) -> bool {
    let (mut ti, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        let ok = match t.get(ti) {
            Some(Tok::Lit(c)) => *c == s[si],
            Some(Tok::One) => true,
            Some(Tok::Class(r, neg)) => r.iter().any(|(a, b)| (*a..=*b).contains(&s[si])) != *neg,
            Some(Tok::Star) => {
                star = Some((ti, si));
                ti += 1;
                continue;
            }
            None => false,
        };
        if ok {
            ti += 1;
            si += 1;
        } else if let Some((st, ss)) = star {
            ti = st + 1;
            si = ss + 1;
            star = Some((st, ss + 1));
        } else {
            return false;
        }
    }
    t[ti..].iter().all(|x| matches!(x, Tok::Star))
}

#[cfg(test)]
mod tests {
    use super::Exclude;

    fn m(p: &str, path: &str) -> bool {
        Exclude::new(&[p]).unwrap().matches(path)
    }

    #[test]
    fn globs() {
        assert!(m("a.db", "a.db"));
        assert!(!m("a.db", "x/a.db"));
        assert!(m("*.db", "cache.db"));
        assert!(!m("*.db", "t/cache.db"));
        assert!(m("**/cache.db", "cache.db"));
        assert!(m("**/cache.db", "a/b/cache.db"));
        assert!(m("tenants/*/tmp-?.db", "tenants/7/tmp-1.db"));
        assert!(!m("tenants/*/tmp-?.db", "tenants/7/tmp-12.db"));
        assert!(m("t/**/x.db", "t/x.db"));
        assert!(m("t/**/x.db", "t/a/b/x.db"));
        assert!(m("scratch", "scratch/a/b.db"));
        assert!(m("scratch/", "scratch/b.db"));
        assert!(m("scratch/**", "scratch/b.db"));
        assert!(!m("scratch", "scratchy/b.db"));
        assert!(m("[a-c]*.db", "b1.db"));
        assert!(!m("[!a-c]*.db", "b1.db"));
        assert!(m("x[-]y", "x-y"));
        assert!(m("a\\*b", "a*b"));
        assert!(!m("a\\*b", "aXb"));
        assert!(m("*a*b*c", "xxaybzzc"));
        assert!(!m("*a*b*c", "xxaybzz"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for p in [
            "", "/abs.db", "a//b", "../x", "a/**b", "[abc", "x\\", "[z-a]",
        ] {
            assert!(Exclude::new(&[p]).is_err(), "{p:?} accepted");
        }
        assert!(Exclude::new::<&str>(&[]).unwrap().is_empty());
    }
}
