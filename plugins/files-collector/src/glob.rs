//! Globs on `/`-separated paths: `*` (any run of characters within a
//! component), `?` (one character), `**` as a whole component (any number
//! of components, zero included). No character classes, no escapes.

pub struct Pattern {
    parts: Vec<String>,
}

impl Pattern {
    pub fn new(text: &str) -> Result<Pattern, String> {
        if text.starts_with('/') {
            return Err("must be relative, starting with the grant's name".into());
        }
        let parts: Vec<String> = text.split('/').map(String::from).collect();
        for part in &parts {
            if part.is_empty() || part == "." || part == ".." {
                return Err("no empty, `.` or `..` component".into());
            }
            if part.contains("**") && part != "**" {
                return Err("`**` must be a whole component (as in `logs/**/*.log`)".into());
            }
        }
        Ok(Pattern { parts })
    }

    pub fn matches(&self, path: &str) -> bool {
        let path: Vec<&str> = path.split('/').collect();
        matches_parts(&self.parts, &path)
    }
}

fn matches_parts(pattern: &[String], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            (0..=path.len()).any(|skip| matches_parts(rest, &path[skip..]))
        }
        Some((first, rest)) => match path.split_first() {
            Some((p, path_rest)) => {
                component(first.as_bytes(), p.as_bytes()) && matches_parts(rest, path_rest)
            }
            None => false,
        },
    }
}

/// `*` and `?` within one component (byte-wise; `?` is one byte).
fn component(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == name[n]) {
            p += 1;
            n += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if let Some((sp, sn)) = star {
            p = sp + 1;
            n = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, path: &str) -> bool {
        Pattern::new(p).unwrap().matches(path)
    }

    #[test]
    fn globs() {
        assert!(m("**", "logs/a.log"));
        assert!(m("**", "logs/x/y/z"));
        assert!(m("logs/*.log", "logs/a.log"));
        assert!(!m("logs/*.log", "logs/sub/a.log"));
        assert!(m("logs/**/*.log", "logs/a.log"));
        assert!(m("logs/**/*.log", "logs/sub/deep/a.log"));
        assert!(!m("logs/**/*.log", "other/a.log"));
        assert!(m("logs/?.log", "logs/a.log"));
        assert!(!m("logs/?.log", "logs/ab.log"));
        assert!(m("*/memcached.log*", "logs/memcached.log.000001.txt"));
        assert!(m("logs/**", "logs/x/y"));
        assert!(!m("logs/*", "logs/x/y"));
        assert!(Pattern::new("/abs").is_err());
        assert!(Pattern::new("a/../b").is_err());
        assert!(Pattern::new("a/x**").is_err());
    }
}
