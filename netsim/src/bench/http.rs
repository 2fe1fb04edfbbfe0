//! A small HTTP/1.1 client with keep-alive, for the `ops` benchmark's client threads: one
//! connection per thread, one request at a time, so a measured latency is one request's
//! round trip and no process is spawned per operation.
//!
//! It speaks just what meshd's control API needs: a request with a `Content-Length` body (raw
//! bytes or JSON) or a body streamed from a reader with `Transfer-Encoding: chunked` (the
//! `jobs` scenario's gigabytes of records, never held in memory), and a response framed by
//! `Content-Length`, `Transfer-Encoding: chunked`, or the end of the connection. Header and
//! body sizes are bounded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Longest status line or header line accepted.
const MAX_LINE: usize = 16 * 1024;
/// Most header lines accepted.
const MAX_HEADERS: usize = 100;
/// Largest chunk of a streamed request body.
const STREAM_CHUNK: usize = 1 << 20;
const OCTET_STREAM: &str = "application/octet-stream";
const JSON: &str = "application/json";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {addr}: {source}")]
    Io {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed HTTP response from {addr}: {reason}")]
    Malformed { addr: String, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// One keep-alive connection to `addr` (host:port), reopened when the server closes it.
#[derive(Debug)]
pub struct Client {
    addr: String,
    token: String,
    timeout: Duration,
    max_body: usize,
    conn: Option<BufReader<TcpStream>>,
    /// Connections opened so far (1 when keep-alive held throughout).
    pub connects: u64,
}

impl Client {
    pub fn new(addr: &str, token: &str, timeout: Duration, max_body: usize) -> Self {
        Self {
            addr: addr.to_string(),
            token: token.to_string(),
            timeout,
            max_body,
            conn: None,
            connects: 0,
        }
    }

    /// Sends one request and reads the whole response.
    pub fn request(&mut self, method: &str, path: &str, body: &[u8]) -> Result<Response, Error> {
        self.send(method, path, OCTET_STREAM, Body::Bytes(body))
    }

    /// Sends one request with a JSON body (`Content-Type: application/json`).
    pub fn request_json(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<Response, Error> {
        self.send(method, path, JSON, Body::Bytes(body))
    }

    /// Sends one request whose body is everything `body` reads, in chunks of at most 1 MiB
    /// (`Transfer-Encoding: chunked`), and reads the whole response.
    pub fn request_streamed(
        &mut self,
        method: &str,
        path: &str,
        body: &mut dyn Read,
    ) -> Result<Response, Error> {
        self.send(method, path, OCTET_STREAM, Body::Stream(body))
    }

    fn send(
        &mut self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Body<'_>,
    ) -> Result<Response, Error> {
        let io = |what: &'static str, addr: &str| {
            let addr = addr.to_string();
            move |source| Error::Io { what, addr, source }
        };
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => {
                let stream =
                    TcpStream::connect(&self.addr).map_err(io("cannot connect to", &self.addr))?;
                stream
                    .set_nodelay(true)
                    .and_then(|()| stream.set_read_timeout(Some(self.timeout)))
                    .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
                    .map_err(io("cannot configure the connection to", &self.addr))?;
                self.connects += 1;
                BufReader::with_capacity(64 * 1024, stream)
            }
        };
        let length = match &body {
            Body::Bytes(bytes) => Some(bytes.len()),
            Body::Stream(_) => None,
        };
        let head = request_head(method, path, &self.addr, &self.token, content_type, length);
        let sent = match body {
            Body::Bytes(bytes) => {
                let mut message = Vec::with_capacity(head.len() + bytes.len());
                message.extend_from_slice(head.as_bytes());
                message.extend_from_slice(bytes);
                conn.get_mut().write_all(&message)
            }
            Body::Stream(reader) => write_chunked(conn.get_mut(), head.as_bytes(), reader),
        };
        if let Err(e) = sent {
            // The server may have answered early (a refused upload) and closed its side;
            // its answer says more than the broken pipe.
            if let Ok((response, _)) = read_response(&mut conn, self.max_body, &self.addr) {
                return Ok(response);
            }
            return Err(io("cannot send to", &self.addr)(e));
        }
        let (response, keep_alive) = read_response(&mut conn, self.max_body, &self.addr)?;
        if keep_alive {
            self.conn = Some(conn);
        }
        Ok(response)
    }
}

/// A request's body.
enum Body<'a> {
    Bytes(&'a [u8]),
    Stream(&'a mut dyn Read),
}

/// Writes `head`, then what `body` reads as chunks (each one write: size line, data, CRLF),
/// then the last chunk.
fn write_chunked(out: &mut impl Write, head: &[u8], body: &mut dyn Read) -> std::io::Result<()> {
    // Room for the size line in front of the data and the CRLF behind it.
    const SIZE_LINE: usize = 16;
    let mut buf = vec![0; SIZE_LINE + STREAM_CHUNK + 2];
    out.write_all(head)?;
    loop {
        let mut n = 0;
        while n < STREAM_CHUNK {
            match body.read(&mut buf[SIZE_LINE + n..SIZE_LINE + STREAM_CHUNK]) {
                Ok(0) => break,
                Ok(read) => n += read,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if n == 0 {
            return out.write_all(b"0\r\n\r\n");
        }
        let size = format!("{n:x}\r\n");
        let start = SIZE_LINE - size.len();
        buf[start..SIZE_LINE].copy_from_slice(size.as_bytes());
        buf[SIZE_LINE + n..SIZE_LINE + n + 2].copy_from_slice(b"\r\n");
        out.write_all(&buf[start..SIZE_LINE + n + 2])?;
    }
}

/// The request line and headers; the body is framed by `Content-Length` when its length is
/// known, else chunked.
fn request_head(
    method: &str,
    path: &str,
    host: &str,
    token: &str,
    content_type: &str,
    len: Option<usize>,
) -> String {
    let framing = match len {
        Some(len) => format!("Content-Length: {len}"),
        None => "Transfer-Encoding: chunked".to_string(),
    };
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
         User-Agent: netsim-bench\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n"
    )
}

/// How the body of a response ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// Reads one response; also returns whether the connection may carry another request.
fn read_response(
    r: &mut impl BufRead,
    max_body: usize,
    addr: &str,
) -> Result<(Response, bool), Error> {
    let malformed = |reason: String| Error::Malformed {
        addr: addr.to_string(),
        reason,
    };
    let status_line = read_line(r, addr)?;
    let status = parse_status_line(&status_line)
        .ok_or_else(|| malformed(format!("bad status line {status_line:?}")))?;
    let mut framing = Framing::UntilClose;
    let mut keep_alive = status_line.starts_with("HTTP/1.1");
    let mut headers = 0;
    loop {
        let line = read_line(r, addr)?;
        if line.is_empty() {
            break;
        }
        headers += 1;
        if headers > MAX_HEADERS {
            return Err(malformed(format!("more than {MAX_HEADERS} headers")));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(malformed(format!("bad header line {line:?}")));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" if framing != Framing::Chunked => {
                let len = value
                    .parse()
                    .map_err(|_| malformed(format!("bad Content-Length {value:?}")))?;
                framing = Framing::Length(len);
            }
            "transfer-encoding" if value.eq_ignore_ascii_case("chunked") => {
                framing = Framing::Chunked;
            }
            "connection" if value.eq_ignore_ascii_case("close") => keep_alive = false,
            _ => {}
        }
    }
    let too_big = |len: usize| malformed(format!("body of {len} bytes exceeds {max_body}"));
    let io = |source| Error::Io {
        what: "cannot read the response from",
        addr: addr.to_string(),
        source,
    };
    let body = match framing {
        Framing::Length(len) if len > max_body => return Err(too_big(len)),
        Framing::Length(len) => {
            let mut body = vec![0; len];
            r.read_exact(&mut body).map_err(io)?;
            body
        }
        Framing::Chunked => {
            let mut body = Vec::new();
            loop {
                let size_line = read_line(r, addr)?;
                let hex = size_line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(hex, 16)
                    .map_err(|_| malformed(format!("bad chunk size {size_line:?}")))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    while !read_line(r, addr)?.is_empty() {}
                    break;
                }
                if body.len() + size > max_body {
                    return Err(too_big(body.len() + size));
                }
                let start = body.len();
                body.resize(start + size, 0);
                r.read_exact(&mut body[start..]).map_err(io)?;
                if !read_line(r, addr)?.is_empty() {
                    return Err(malformed("chunk not followed by CRLF".to_string()));
                }
            }
            body
        }
        Framing::UntilClose => {
            keep_alive = false;
            let mut body = Vec::new();
            r.take(max_body as u64 + 1)
                .read_to_end(&mut body)
                .map_err(io)?;
            if body.len() > max_body {
                return Err(too_big(body.len()));
            }
            body
        }
    };
    Ok((Response { status, body }, keep_alive))
}

/// The status code of `HTTP/1.x NNN reason`.
fn parse_status_line(line: &str) -> Option<u16> {
    let mut parts = line.splitn(3, ' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    (code.len() == 3).then_some(())?;
    code.parse().ok()
}

/// One line without its CRLF; an error at end of stream or past `MAX_LINE`.
fn read_line(r: &mut impl BufRead, addr: &str) -> Result<String, Error> {
    let mut line = Vec::new();
    let read = r
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(|source| Error::Io {
            what: "cannot read the response from",
            addr: addr.to_string(),
            source,
        })?;
    let malformed = |reason: &str| Error::Malformed {
        addr: addr.to_string(),
        reason: reason.to_string(),
    };
    if read == 0 {
        return Err(malformed("connection closed before a complete response"));
    }
    if line.last() != Some(&b'\n') {
        return Err(malformed("line too long or cut off"));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| malformed("header is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn parse(raw: &str) -> Result<(Response, bool), Error> {
        read_response(&mut Cursor::new(raw.as_bytes().to_vec()), 1024, "test")
    }

    #[test]
    fn content_length_and_keep_alive() {
        let raw = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 404 Not Found\r\ncontent-length: 2\r\nconnection: close\r\n\r\nno";
        let mut cursor = Cursor::new(raw.as_bytes().to_vec());
        let (first, keep) = read_response(&mut cursor, 1024, "t").expect("first");
        assert_eq!(
            (first.status, first.body.as_slice(), keep),
            (200, &b"hello"[..], true)
        );
        let (second, keep) = read_response(&mut cursor, 1024, "t").expect("second");
        assert_eq!(
            (second.status, second.body.as_slice(), keep),
            (404, &b"no"[..], false)
        );
        assert!(
            read_response(&mut cursor, 1024, "t").is_err(),
            "nothing left"
        );
    }

    #[test]
    fn chunked_bodies() {
        let raw = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n6;ext=1\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\nX-Trailer: 1\r\n\r\n";
        let (r, keep) = parse(raw).expect("chunked");
        assert_eq!(r.body, b"Wikipedia in \r\n\r\nchunks.");
        assert!(keep);
        assert!(parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
        assert!(
            parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n0\r\n\r\n")
                .is_err()
        );
    }

    #[test]
    fn bounds_and_bad_input() {
        assert!(matches!(
            parse("HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n"),
            Err(Error::Malformed { .. })
        ));
        assert!(parse("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort").is_err());
        assert!(parse("SMTP 220 hi\r\n\r\n").is_err());
        assert!(parse("HTTP/1.1 20 OK\r\n\r\n").is_err());
        assert!(parse("HTTP/1.1 200 OK\r\nno colon\r\n\r\n").is_err());
        let long = format!(
            "HTTP/1.1 200 OK\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_LINE + 10)
        );
        assert!(parse(&long).is_err());
        // No length: the body runs to the end, and the connection cannot be reused.
        let (r, keep) = parse("HTTP/1.0 200 OK\r\n\r\nrest").expect("until close");
        assert_eq!((r.body.as_slice(), keep), (&b"rest"[..], false));
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line("HTTP/1.1 201 Created"), Some(201));
        assert_eq!(parse_status_line("HTTP/1.0 503"), Some(503));
        assert_eq!(parse_status_line("HTTP/2 200"), None);
    }

    #[test]
    fn request_head_has_length_and_token() {
        let head = request_head(
            "POST",
            "/v1/objects?redundancy=rep:3",
            "127.0.0.1:1",
            "tok",
            OCTET_STREAM,
            Some(4096),
        );
        assert!(head.starts_with("POST /v1/objects?redundancy=rep:3 HTTP/1.1\r\n"));
        assert!(head.contains("\r\nAuthorization: Bearer tok\r\n"));
        assert!(head.contains("\r\nContent-Type: application/octet-stream\r\n"));
        assert!(head.contains("\r\nContent-Length: 4096\r\n"));
        assert!(head.ends_with("\r\n\r\n"));
        let head = request_head("POST", "/v1/jobs", "h", "t", JSON, None);
        assert!(head.contains("\r\nContent-Type: application/json\r\n"));
        assert!(head.contains("\r\nTransfer-Encoding: chunked\r\n"));
        assert!(!head.contains("Content-Length"));
    }

    /// A reader that hands out at most `step` bytes per call, to exercise partial reads.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.data.len().min(self.step).min(buf.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn chunked_bodies_are_framed_and_parse_back() {
        let data: Vec<u8> = (0..STREAM_CHUNK * 2 + 12_345)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut out = Vec::new();
        let mut reader = Trickle {
            data: &data,
            step: 100_000,
        };
        write_chunked(&mut out, b"HEAD\r\n\r\n", &mut reader).expect("write");
        assert!(out.starts_with(b"HEAD\r\n\r\n100000\r\n"));
        assert!(
            out.ends_with(b"\r\n0\r\n\r\n"),
            "the last chunk ends the body"
        );
        // The same framing as a response: the chunked reader gives the bytes back.
        let mut response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        response.extend_from_slice(&out[b"HEAD\r\n\r\n".len()..]);
        let (r, _) = read_response(&mut Cursor::new(response), 4 << 20, "t").expect("parse");
        assert_eq!(r.body, data);
        let mut empty = Vec::new();
        write_chunked(&mut empty, b"", &mut std::io::empty()).expect("empty");
        assert_eq!(empty, b"0\r\n\r\n");
    }

    #[test]
    fn talks_to_a_server_over_keep_alive() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut writer = stream;
            for _ in 0..2 {
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).expect("line");
                    if line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.strip_prefix("Content-Length: ") {
                        len = v.trim().parse().expect("len");
                    }
                }
                let mut body = vec![0; len];
                reader.read_exact(&mut body).expect("body");
                let reply = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                writer.write_all(reply.as_bytes()).expect("write");
                writer.write_all(&body).expect("write");
            }
        });
        let mut client = Client::new(&addr, "t", Duration::from_secs(5), 1 << 20);
        for body in [&b"ping"[..], &b"second request"[..]] {
            let r = client.request("POST", "/echo", body).expect("request");
            assert_eq!((r.status, r.body.as_slice()), (200, body));
        }
        assert_eq!(
            client.connects, 1,
            "the second request reused the connection"
        );
        server.join().expect("server");
    }
}
