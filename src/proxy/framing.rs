//! A read-only watch on the HTTP/1 requests a client sends, to catch what hyper's parser
//! accepts but leaves no trace of: a head with both `Content-Length` and `Transfer-Encoding`.
//! hyper frames such a request by chunked, drops the `Content-Length` from the header map and
//! closes the connection after answering (RFC 9112 §6.1 allows that), so the request it hands
//! over looks like any chunked one. The rule is stricter: such a request is a
//! smuggling attempt, answered 400 and never forwarded.
//!
//! The watch reads the same bytes hyper reads, in the same order, and follows the message
//! framing (head, then a `Content-Length` or chunked body) to know where each head starts.
//! It remembers the position of the first head that carried both headers; the service knows
//! its own position in the connection's requests (HTTP/1 serves them one after another), so
//! it can tell whether the request it was handed is that one. After such a head hyper closes
//! the connection, so no later one matters. Anything the watch cannot follow (HTTP/2, an
//! upgrade, framing hyper will reject) turns it off: from then on it flags nothing, which is
//! hyper's own behaviour, never a refusal of a request it did not understand.

/// Bytes of a line kept: enough for a header name and a `Content-Length` value.
const LINE_KEPT: usize = 64;

/// Where in the request stream the next byte falls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Before a request line (empty lines before one are skipped, as hyper does).
    Start,
    RequestLine,
    Headers,
    /// A `Content-Length` body with this much left.
    Body(u64),
    ChunkSize,
    /// Chunk data with this much left, then CR LF.
    ChunkData(u64),
    ChunkDataCr,
    ChunkDataLf,
    Trailers,
    /// Not following any more.
    Off,
}

/// What the current head said about its framing.
#[derive(Debug, Default)]
struct Head {
    content_length: Option<u64>,
    /// A `Content-Length` that does not parse as one number (hyper answers 400).
    bad_length: bool,
    transfer_encoding: bool,
    /// `CONNECT` or `Upgrade`: what follows may not be HTTP/1.
    upgrade: bool,
    /// A shape hyper rejects outright (the connection closes without dispatching it).
    malformed: bool,
}

/// Follows one connection's request stream; feed it every byte read, in order.
#[derive(Debug)]
pub struct Framing {
    stage: Stage,
    head: Head,
    /// The start of the current line.
    line: [u8; LINE_KEPT],
    line_len: usize,
    /// The current line is longer than what was kept.
    line_cut: bool,
    /// Heads seen in full so far.
    heads: u64,
    /// Position (0-based) of the first head with both framing headers.
    conflicting: Option<u64>,
}

impl Default for Framing {
    fn default() -> Self {
        Self {
            stage: Stage::Start,
            head: Head::default(),
            line: [0; LINE_KEPT],
            line_len: 0,
            line_cut: false,
            heads: 0,
            conflicting: None,
        }
    }
}

impl Framing {
    /// The position of the first request whose head had both `Content-Length` and
    /// `Transfer-Encoding`, once it has been read in full.
    pub fn conflicting(&self) -> Option<u64> {
        self.conflicting
    }

    /// True between requests: the next byte starts a request line (so a connection can be
    /// parked here). Never for a stream the watch stopped following.
    pub fn at_boundary(&self) -> bool {
        self.stage == Stage::Start && self.conflicting.is_none()
    }

    /// True while the client is in the middle of sending a request head or body (or of one
    /// that was refused for its framing): closing now leaves bytes of it unread.
    pub fn mid_request(&self) -> bool {
        self.mid_body() || matches!(self.stage, Stage::RequestLine | Stage::Headers)
    }

    /// True while the client is in the middle of sending a request body (or of one that
    /// was refused for its framing).
    pub fn mid_body(&self) -> bool {
        self.conflicting.is_some()
            || matches!(
                self.stage,
                Stage::Body(_)
                    | Stage::ChunkSize
                    | Stage::ChunkData(_)
                    | Stage::ChunkDataCr
                    | Stage::ChunkDataLf
                    | Stage::Trailers
            )
    }

    /// Follow `bytes`, the next ones read from the client.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.stage {
                Stage::Off => return,
                Stage::Start => {
                    let skip = bytes
                        .iter()
                        .position(|b| !matches!(b, b'\r' | b'\n'))
                        .unwrap_or(bytes.len());
                    bytes = &bytes[skip..];
                    if !bytes.is_empty() {
                        self.head = Head::default();
                        self.stage = Stage::RequestLine;
                    }
                }
                Stage::Body(left) | Stage::ChunkData(left) => {
                    let n = usize::try_from(left).map_or(bytes.len(), |l| l.min(bytes.len()));
                    bytes = &bytes[n..];
                    let left = left - n as u64;
                    self.stage = match (self.stage, left) {
                        (Stage::Body(_), 0) => Stage::Start,
                        (Stage::Body(_), _) => Stage::Body(left),
                        (_, 0) => Stage::ChunkDataCr,
                        _ => Stage::ChunkData(left),
                    };
                }
                Stage::ChunkDataCr | Stage::ChunkDataLf => {
                    let (want, next) = if self.stage == Stage::ChunkDataCr {
                        (b'\r', Stage::ChunkDataLf)
                    } else {
                        (b'\n', Stage::ChunkSize)
                    };
                    // hyper fails the body on anything else and closes the connection.
                    self.stage = if bytes[0] == want { next } else { Stage::Off };
                    bytes = &bytes[1..];
                }
                Stage::RequestLine | Stage::Headers | Stage::ChunkSize | Stage::Trailers => {
                    let end = bytes.iter().position(|&b| b == b'\n');
                    let taken = end.map_or(bytes.len(), |i| i + 1);
                    self.keep(&bytes[..end.unwrap_or(bytes.len())]);
                    bytes = &bytes[taken..];
                    if end.is_some() {
                        self.line_done();
                    }
                }
            }
        }
    }

    fn keep(&mut self, part: &[u8]) {
        let room = LINE_KEPT - self.line_len;
        let n = part.len().min(room);
        self.line[self.line_len..self.line_len + n].copy_from_slice(&part[..n]);
        self.line_len += n;
        self.line_cut |= part.len() > room;
    }

    /// A whole line (its LF consumed) is in `line`.
    fn line_done(&mut self) {
        let mut len = self.line_len;
        if !self.line_cut && len > 0 && self.line[len - 1] == b'\r' {
            len -= 1;
        }
        let empty = len == 0 && !self.line_cut;
        let cut = self.line_cut;
        let line = self.line;
        let line = &line[..len];
        self.line_len = 0;
        self.line_cut = false;
        self.stage = match self.stage {
            Stage::RequestLine => {
                if line.starts_with(b"PRI ") {
                    // The HTTP/2 preface: not ours to follow.
                    Stage::Off
                } else {
                    self.head.upgrade = line.starts_with(b"CONNECT ");
                    Stage::Headers
                }
            }
            Stage::Headers if empty => self.head_done(),
            Stage::Headers => {
                self.header(line, cut);
                Stage::Headers
            }
            Stage::ChunkSize => chunk_size(line).map_or(Stage::Off, |size| {
                if size == 0 {
                    Stage::Trailers
                } else {
                    Stage::ChunkData(size)
                }
            }),
            Stage::Trailers if empty => Stage::Start,
            other => other,
        };
    }

    fn header(&mut self, line: &[u8], cut: bool) {
        if matches!(line.first(), Some(b' ' | b'\t')) {
            // A folded line: hyper rejects the head.
            self.head.malformed = true;
            return;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.eq_ignore_ascii_case(b"content-length") {
            let length = if cut { None } else { content_length(value) };
            match (length, self.head.content_length) {
                (Some(n), None) => self.head.content_length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => self.head.bad_length = true,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.head.transfer_encoding = true;
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            self.head.upgrade = true;
        }
    }

    /// The empty line after the headers: note the head, then follow its body.
    fn head_done(&mut self) -> Stage {
        let position = self.heads;
        self.heads += 1;
        let head = std::mem::take(&mut self.head);
        let has_length = head.content_length.is_some() || head.bad_length;
        if head.transfer_encoding && has_length && !head.malformed {
            self.conflicting.get_or_insert(position);
            // hyper closes the connection after answering this one.
            return Stage::Off;
        }
        if head.upgrade || head.bad_length || head.malformed {
            return Stage::Off;
        }
        if head.transfer_encoding {
            return Stage::ChunkSize;
        }
        match head.content_length {
            Some(n) if n > 0 => Stage::Body(n),
            _ => Stage::Start,
        }
    }
}

/// A `Content-Length` value: one decimal number, or a list of the same number.
fn content_length(value: &[u8]) -> Option<u64> {
    let mut found = None;
    for part in value.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n: u64 = std::str::from_utf8(part).ok()?.parse().ok()?;
        if found.is_some_and(|f| f != n) {
            return None;
        }
        found = Some(n);
    }
    found
}

/// The size at the start of a chunk-size line (hex digits, then extensions).
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&line[..digits]).ok()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `stream` whole and one byte at a time; both must agree.
    fn conflicting(stream: &[u8]) -> Option<u64> {
        let mut whole = Framing::default();
        whole.feed(stream);
        let mut bytewise = Framing::default();
        for b in stream {
            bytewise.feed(std::slice::from_ref(b));
        }
        assert_eq!(whole.conflicting(), bytewise.conflicting());
        assert_eq!(whole.heads, bytewise.heads);
        whole.conflicting()
    }

    #[test]
    fn plain_requests_are_never_flagged() {
        let stream = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n\
            POST /a HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello\
            POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nx-t: 1\r\n\r\n\
            \r\nGET /c HTTP/1.1\nhost: x\n\n";
        let mut framing = Framing::default();
        framing.feed(stream);
        assert_eq!(framing.heads, 4);
        assert_eq!(conflicting(stream), None);
    }

    #[test]
    fn bodies_that_look_like_heads_are_skipped() {
        let body = "GET /x HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
        let stream = format!(
            "POST /a HTTP/1.1\r\ncontent-length: {}\r\n\r\n{body}\
             POST /b HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n\
             GET /c HTTP/1.1\r\n\r\n",
            body.len(),
            body.len()
        );
        let mut framing = Framing::default();
        framing.feed(stream.as_bytes());
        assert_eq!(framing.heads, 3);
        assert_eq!(conflicting(stream.as_bytes()), None);
    }

    #[test]
    fn both_framing_headers_are_flagged_at_their_position() {
        for head in [
            "POST / HTTP/1.1\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: x\r\n\r\n",
        ] {
            assert_eq!(conflicting(head.as_bytes()), Some(0), "{head}");
            let second = format!("GET / HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi{head}");
            assert_eq!(conflicting(second.as_bytes()), Some(1), "{head}");
        }
    }

    #[test]
    fn what_cannot_be_followed_turns_the_watch_off() {
        let late = "GET / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
        for first in [
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET / HTTP/1.1\r\nupgrade: websocket\r\n\r\n",
            "CONNECT x:443 HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 5, 6\r\n\r\nhello!",
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloXX",
        ] {
            let stream = format!("{first}{late}");
            assert_eq!(conflicting(stream.as_bytes()), None, "{first}");
        }
    }

    #[test]
    fn long_lines_keep_their_start() {
        let stream = format!(
            "GET /{} HTTP/1.1\r\nx-long: {}\r\ncontent-length: 0\r\ntransfer-encoding: chunked\r\n\r\n",
            "u".repeat(500),
            "v".repeat(500)
        );
        assert_eq!(conflicting(stream.as_bytes()), Some(0));
        assert_eq!(content_length(b" 12 , 12"), Some(12));
        assert_eq!(content_length(b"+12"), None);
        assert_eq!(chunk_size(b"fffffffffffffffff"), None);
        assert_eq!(chunk_size(b"1A;x"), Some(26));
    }
}
