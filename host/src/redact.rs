//! Couchbase's partial log redaction, natively and streaming, byte for
//! byte what `cbcollect_info` writes into its `-redacted.zip`.
//!
//! `cbcollect_info`'s `RegularLogProcessor` rewrites each line with two
//! regular expressions, in this order:
//!
//! 1. `(<ud>)(.+?)(</ud>)`: the text inside each user-data tag becomes
//!    the hex SHA-1 of salt + text (the tags stay). `.+?` takes at least
//!    one byte and stops at the first `</ud>` after it, so `<ud></ud>` is
//!    not a tag of its own, and a tag left open on its line stays as it
//!    is.
//! 2. `(log-redaction-salt)(.+)`: the rest of a line after
//!    `log-redaction-salt` becomes ` <redacted>` (so a `ps` listing of a
//!    collection's own command line never shows the salt).
//!
//! and `couchbase.log`'s `RedactLevel` line becomes
//! `RedactLevel:partial,HashOfSalt:<hex SHA-1 of salt + salt>`
//! ([`redact_level_line`]).
//!
//! [`Redactor`] applies the two rules as a pair of byte-at-a-time state
//! machines, so input arrives in chunks of any size and lines of any
//! length are handled without holding the line. A line ends at `\n`
//! only (`.` matches everything else, `\r` included), and the rules work
//! on bytes: a tag's content is hashed as the bytes it is (UTF-8 in, the
//! SHA-1 of its UTF-8 out, as Python's `.encode()`).
//!
//! Memory is bounded: the content of an open tag is held until its
//! `</ud>` to be written back as it was if the line ends first, up to
//! [`MAX_HELD_TAG`]. A tag still open past that is hashed as it goes and,
//! if its line ends without `</ud>`, written as `<ud>HASH` (redacted, not
//! left in clear): the one place where this differs from
//! `cbcollect_info`, which would hold the whole line in memory.

use sha1::{Digest, Sha1};

use crate::hex;

const OPEN: &[u8] = b"<ud>";
const CLOSE: &[u8] = b"</ud>";
const SALT_KEY: &[u8] = b"log-redaction-salt";
const REDACTED: &[u8] = b" <redacted>";

/// Most content of one open `<ud>` tag held back before it is redacted
/// without waiting for its end.
pub const MAX_HELD_TAG: usize = 1 << 20;

/// Hex SHA-1 of `salt` followed by `text`.
fn hash(salt: &[u8], text: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(salt);
    h.update(text);
    hex(&h.finalize())
}

/// `HashOfSalt`: the hex SHA-1 of salt + salt, which identifies the salt
/// of a redacted bundle without revealing it.
pub fn hash_of_salt(salt: &str) -> String {
    hash(salt.as_bytes(), salt.as_bytes())
}

/// What `couchbase.log`'s `RedactLevel` line becomes (with its `\n`).
pub fn redact_level_line(salt: &str) -> String {
    format!("RedactLevel:partial,HashOfSalt:{}\n", hash_of_salt(salt))
}

/// Where the longest tail of `bytes` that is a proper prefix of
/// `pattern` starts (`bytes.len()` if none): that tail may be completed
/// by the next chunk.
fn cut_prefix(bytes: &[u8], pattern: &[u8]) -> usize {
    let longest = (pattern.len() - 1).min(bytes.len());
    (bytes.len() - longest..bytes.len())
        .find(|&t| pattern.starts_with(&bytes[t..]))
        .unwrap_or(bytes.len())
}

/// Rule 1: `<ud>TEXT</ud>` → `<ud>SHA1(salt + TEXT)</ud>`.
struct TagRule {
    /// A SHA-1 that has taken the salt: each tag starts from a copy.
    salted: Sha1,
    state: TagState,
    /// Bytes that may be the start of `<ud>` (outside a tag).
    pending: Vec<u8>,
    /// An open tag's content so far (all of it while `held`), and the
    /// hash of what has left the 5-byte window that may become `</ud>`.
    content: Vec<u8>,
    held: bool,
    hasher: Sha1,
    /// The last bytes of the content, not hashed yet: they may be `</ud>`.
    window: Vec<u8>,
    content_len: usize,
}

#[derive(PartialEq)]
enum TagState {
    Outside,
    Inside,
}

impl TagRule {
    fn new(salt: &[u8]) -> TagRule {
        let mut salted = Sha1::new();
        salted.update(salt);
        TagRule {
            salted,
            state: TagState::Outside,
            pending: Vec::with_capacity(OPEN.len()),
            content: Vec::new(),
            held: true,
            hasher: Sha1::new(),
            window: Vec::with_capacity(CLOSE.len()),
            content_len: 0,
        }
    }

    fn open_tag(&mut self) {
        self.state = TagState::Inside;
        self.content.clear();
        self.held = true;
        self.hasher = self.salted.clone();
        self.window.clear();
        self.content_len = 0;
    }

    /// The bulk path: between tags, everything up to the next `<ud>` is
    /// copied at once; inside a tag, everything up to its `</ud>` or the
    /// line's end is hashed at once. Only a pattern cut by the end of
    /// `input` goes byte by byte through [`TagRule::push`].
    fn push_slice(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut i = 0;
        while i < input.len() {
            let rest = &input[i..];
            match self.state {
                TagState::Outside if self.pending.is_empty() => {
                    match memchr::memmem::find(rest, OPEN) {
                        Some(n) => {
                            out.extend_from_slice(&rest[..n]);
                            self.open_tag();
                            i += n + OPEN.len();
                        }
                        None => {
                            let keep = cut_prefix(rest, OPEN);
                            out.extend_from_slice(&rest[..keep]);
                            self.pending.extend_from_slice(&rest[keep..]);
                            return;
                        }
                    }
                }
                TagState::Inside if self.window.is_empty() => {
                    // `</ud>` counts only after one byte of content.
                    let skip = usize::from(self.content_len == 0).min(rest.len());
                    let close = memchr::memmem::find(&rest[skip..], CLOSE).map(|n| n + skip);
                    let newline = memchr::memchr(b'\n', rest);
                    let end = match (close, newline) {
                        (Some(c), Some(nl)) if nl < c => nl,
                        (Some(c), _) => c,
                        (None, Some(nl)) => nl,
                        (None, None) => cut_prefix(rest, CLOSE).max(skip),
                    };
                    self.content_bytes(&rest[..end]);
                    i += end;
                    if close == Some(end) {
                        self.close_tag(out);
                        i += CLOSE.len();
                    } else if end < rest.len() {
                        // A newline, or the start of a cut `</ud>`.
                        self.push(input[i], out);
                        i += 1;
                    }
                }
                _ => {
                    self.push(input[i], out);
                    i += 1;
                }
            }
        }
    }

    /// Content of the open tag (none of it part of `</ud>`).
    fn content_bytes(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.content_len += bytes.len();
        if self.held {
            self.content.extend_from_slice(bytes);
            if self.content.len() > MAX_HELD_TAG {
                self.held = false;
                self.content = Vec::new();
            }
        }
    }

    fn close_tag(&mut self, out: &mut Vec<u8>) {
        let digest = hex(&self.hasher.clone().finalize());
        out.extend_from_slice(OPEN);
        out.extend_from_slice(digest.as_bytes());
        out.extend_from_slice(CLOSE);
        self.state = TagState::Outside;
        self.content.clear();
        self.window.clear();
    }

    fn push(&mut self, byte: u8, out: &mut Vec<u8>) {
        match self.state {
            TagState::Outside => {
                self.pending.push(byte);
                if self.pending == OPEN {
                    self.pending.clear();
                    self.open_tag();
                    return;
                }
                // Keep only a tail that can still become `<ud>`.
                while !OPEN.starts_with(&self.pending) {
                    out.push(self.pending.remove(0));
                }
            }
            TagState::Inside => {
                if byte == b'\n' {
                    self.line_ended(out);
                    out.push(b'\n');
                    return;
                }
                self.content_len += 1;
                if self.held {
                    self.content.push(byte);
                }
                self.window.push(byte);
                // `</ud>` closes the tag only after at least one byte of
                // content (`.+?`).
                if self.window == CLOSE && self.content_len > CLOSE.len() {
                    self.close_tag(out);
                    return;
                }
                if self.window.len() > CLOSE.len() || !CLOSE.starts_with(&self.window) {
                    // The window's first byte can no longer be part of the
                    // closing tag: it is content.
                    while !self.window.is_empty() && !CLOSE.starts_with(&self.window) {
                        let first = self.window.remove(0);
                        self.hasher.update([first]);
                    }
                }
                if self.held && self.content.len() > MAX_HELD_TAG {
                    self.held = false;
                    self.content = Vec::new();
                }
            }
        }
    }

    /// The line (or the input) ended inside a tag: no `</ud>` came.
    fn line_ended(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(OPEN);
        if self.held {
            out.extend_from_slice(&self.content);
        } else {
            // Past what we hold: redacted rather than left in clear.
            for &b in &self.window {
                self.hasher.update([b]);
            }
            out.extend_from_slice(hex(&self.hasher.clone().finalize()).as_bytes());
        }
        self.state = TagState::Outside;
        self.content.clear();
        self.window.clear();
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        match self.state {
            TagState::Outside => out.append(&mut self.pending),
            TagState::Inside => self.line_ended(out),
        }
    }
}

/// Rule 2: `log-redaction-salt` + the rest of the line → `log-redaction-salt <redacted>`.
struct SaltRule {
    state: SaltState,
    pending: Vec<u8>,
}

#[derive(PartialEq)]
enum SaltState {
    Searching,
    /// Just after `log-redaction-salt`: redact if anything but `\n` follows.
    AfterKey,
    /// Dropping the rest of the line.
    Dropping,
}

impl SaltRule {
    fn new() -> SaltRule {
        SaltRule {
            state: SaltState::Searching,
            pending: Vec::with_capacity(SALT_KEY.len()),
        }
    }

    /// The bulk path: everything up to the next key is copied, and a
    /// dropped line's rest skipped, at once; only a key cut by the end of
    /// `input` goes byte by byte through [`SaltRule::push`].
    fn push_slice(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut i = 0;
        while i < input.len() {
            let rest = &input[i..];
            match self.state {
                SaltState::Searching if self.pending.is_empty() => {
                    match memchr::memmem::find(rest, SALT_KEY) {
                        Some(n) => {
                            out.extend_from_slice(&rest[..n + SALT_KEY.len()]);
                            self.state = SaltState::AfterKey;
                            i += n + SALT_KEY.len();
                        }
                        None => {
                            let keep = cut_prefix(rest, SALT_KEY);
                            out.extend_from_slice(&rest[..keep]);
                            self.pending.extend_from_slice(&rest[keep..]);
                            return;
                        }
                    }
                }
                SaltState::Dropping => match memchr::memchr(b'\n', rest) {
                    Some(n) => {
                        out.push(b'\n');
                        self.state = SaltState::Searching;
                        i += n + 1;
                    }
                    None => return,
                },
                _ => {
                    self.push(input[i], out);
                    i += 1;
                }
            }
        }
    }

    fn push(&mut self, byte: u8, out: &mut Vec<u8>) {
        match self.state {
            SaltState::Searching => {
                self.pending.push(byte);
                if self.pending == SALT_KEY {
                    out.append(&mut self.pending);
                    self.state = SaltState::AfterKey;
                    return;
                }
                while !SALT_KEY.starts_with(&self.pending) {
                    out.push(self.pending.remove(0));
                }
            }
            SaltState::AfterKey => {
                if byte == b'\n' {
                    out.push(b'\n');
                    self.state = SaltState::Searching;
                } else {
                    out.extend_from_slice(REDACTED);
                    self.state = SaltState::Dropping;
                }
            }
            SaltState::Dropping => {
                if byte == b'\n' {
                    out.push(b'\n');
                    self.state = SaltState::Searching;
                }
            }
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.pending);
        self.state = SaltState::Searching;
    }
}

/// Couchbase's partial redaction of one file's bytes, streaming.
pub struct Redactor {
    tags: TagRule,
    salt_rule: SaltRule,
    between: Vec<u8>,
}

impl Redactor {
    pub fn new(salt: &str) -> Redactor {
        Redactor {
            tags: TagRule::new(salt.as_bytes()),
            salt_rule: SaltRule::new(),
            between: Vec::new(),
        }
    }

    /// Redact the next chunk of input, appending the result to `out`.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        self.tags.push_slice(input, &mut self.between);
        self.drain(out);
    }

    /// The input ended: flush what was held back.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.tags.finish(&mut self.between);
        self.drain(out);
        self.salt_rule.finish(out);
    }

    fn drain(&mut self, out: &mut Vec<u8>) {
        self.salt_rule.push_slice(&self.between, out);
        self.between.clear();
    }
}

/// Redact a whole input at once.
pub fn redact(salt: &str, input: &[u8]) -> Vec<u8> {
    let mut r = Redactor::new(salt);
    let mut out = Vec::with_capacity(input.len());
    r.push(input, &mut out);
    r.finish(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SALT: &str = "c0ffee";

    fn h(text: &str) -> String {
        hash(SALT.as_bytes(), text.as_bytes())
    }

    fn r(input: &str) -> String {
        String::from_utf8(redact(SALT, input.as_bytes())).unwrap()
    }

    #[test]
    fn a_tag_becomes_the_sha1_of_salt_and_text() {
        // Computed independently: `printf c0ffeealice | sha1sum`.
        assert_eq!(h("alice"), "251c35443a6b062083516dacac72f4242ba5df94");
        assert_eq!(
            r("login <ud>alice</ud> ok\n"),
            format!("login <ud>{}</ud> ok\n", h("alice"))
        );
    }

    #[test]
    fn several_tags_on_one_line() {
        assert_eq!(
            r("<ud>a</ud> and <ud>bb</ud>, <ud>a</ud>\n"),
            format!(
                "<ud>{}</ud> and <ud>{}</ud>, <ud>{}</ud>\n",
                h("a"),
                h("bb"),
                h("a")
            )
        );
    }

    #[test]
    fn multi_byte_utf8_inside_a_tag_is_hashed_as_its_utf8_bytes() {
        // `printf 'c0ffeeZoë 名前' | sha1sum` (UTF-8).
        assert_eq!(h("Zoë 名前"), "31b7c190bc9ef3f818af2f9fd59ad21ef46c81f1");
        assert_eq!(
            r("user <ud>Zoë 名前</ud>\n"),
            format!("user <ud>{}</ud>\n", h("Zoë 名前"))
        );
    }

    #[test]
    fn tags_follow_the_regular_expression_exactly() {
        // `.+?` needs one byte: `<ud></ud>` is content of a later close.
        assert_eq!(
            r("<ud></ud>x</ud>\n"),
            format!("<ud>{}</ud>\n", h("</ud>x"))
        );
        assert_eq!(r("<ud></ud>\n"), "<ud></ud>\n");
        // The first close after the first open ends the match.
        assert_eq!(
            r("<ud>a <ud>b</ud> c</ud>\n"),
            format!("<ud>{}</ud> c</ud>\n", h("a <ud>b"))
        );
        // A tag left open on its line stays as it is; the next line is new.
        assert_eq!(
            r("<ud>open\n<ud>x</ud>\n"),
            format!("<ud>open\n<ud>{}</ud>\n", h("x"))
        );
        // No newline at the end.
        assert_eq!(r("<ud>x</ud>"), format!("<ud>{}</ud>", h("x")));
        assert_eq!(r("tail <ud>x"), "tail <ud>x");
        assert_eq!(r("almost <u"), "almost <u");
        // `\r` is content (only `\n` ends a line).
        assert_eq!(r("<ud>x\r</ud>\r\n"), format!("<ud>{}</ud>\r\n", h("x\r")));
        // Near misses.
        assert_eq!(r("<<ud>x</ud>\n"), format!("<<ud>{}</ud>\n", h("x")));
        assert_eq!(r("<ud>x</u</ud>\n"), format!("<ud>{}</ud>\n", h("x</u")));
    }

    #[test]
    fn the_rest_of_a_line_after_log_redaction_salt_is_redacted() {
        assert_eq!(
            r("cbcollect_info --log-redaction-salt=s3cret out.zip\nnext\n"),
            "cbcollect_info --log-redaction-salt <redacted>\nnext\n"
        );
        // Nothing after it: unchanged (`.+` needs a byte).
        assert_eq!(r("log-redaction-salt\n"), "log-redaction-salt\n");
        assert_eq!(r("log-redaction-salt"), "log-redaction-salt");
        // `\r` counts as the rest of the line.
        assert_eq!(
            r("log-redaction-salt\r\n"),
            "log-redaction-salt <redacted>\n"
        );
        // Tags are hashed first, then the salt rule runs on the result.
        assert_eq!(
            r("<ud>bob</ud> --log-redaction-salt=x <ud>eve</ud>\n"),
            format!("<ud>{}</ud> --log-redaction-salt <redacted>\n", h("bob"))
        );
        // A key inside a tag is hashed away with the tag.
        assert_eq!(
            r("<ud>log-redaction-salt=x</ud> y\n"),
            format!("<ud>{}</ud> y\n", h("log-redaction-salt=x"))
        );
    }

    #[test]
    fn the_redact_level_line_carries_the_hash_of_salt_and_salt() {
        // `printf c0ffeec0ffee | sha1sum`.
        let want = "3d5de9745b06c0f8237de1f5771faf13265d2c87";
        assert_eq!(hash_of_salt(SALT), want);
        assert_eq!(
            redact_level_line(SALT),
            format!("RedactLevel:partial,HashOfSalt:{want}\n")
        );
    }

    #[test]
    fn chunk_boundaries_anywhere_give_the_same_bytes() {
        let input =
            "a <ud>Zoë</ud> b <ud>x</ud>y\n<ud>open\n--log-redaction-salt=z\n<ud></ud>q</ud>\n";
        let whole = redact(SALT, input.as_bytes());
        for size in 1..input.len() {
            let mut r = Redactor::new(SALT);
            let mut out = Vec::new();
            for chunk in input.as_bytes().chunks(size) {
                r.push(chunk, &mut out);
            }
            r.finish(&mut out);
            assert_eq!(out, whole, "chunks of {size}");
        }
    }

    #[test]
    fn lines_longer_than_any_buffer() {
        let user = "u".repeat(3 * 65536);
        let filler = "f".repeat(200_000);
        let input = format!("{filler}<ud>{user}</ud>{filler}\n");
        let mut r = Redactor::new(SALT);
        let mut out = Vec::new();
        for chunk in input.as_bytes().chunks(8192) {
            r.push(chunk, &mut out);
        }
        r.finish(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{filler}<ud>{}</ud>{filler}\n", h(&user))
        );
    }

    #[test]
    fn a_tag_open_past_what_is_held_is_redacted_not_left_in_clear() {
        let secret = "s".repeat(MAX_HELD_TAG + 10);
        let out = r(&format!("<ud>{secret}\nnext\n"));
        assert_eq!(out, format!("<ud>{}\nnext\n", h(&secret)));
        // Closed, it is the ordinary hash.
        let out = r(&format!("<ud>{secret}</ud>\n"));
        assert_eq!(out, format!("<ud>{}</ud>\n", h(&secret)));
    }
}
