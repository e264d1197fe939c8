//! hello: the example app Roost deploys, and the app its tests deploy.
//!
//! A small HTTP/1.1 server with no dependencies, so it builds into one static
//! binary that runs in a `FROM scratch` image (no registry needed):
//!
//!     rustc -O -C target-feature=+crt-static --target x86_64-unknown-linux-gnu main.rs -o hello
//!
//! It answers on $PORT (8080 by default), keeping connections alive:
//! - `GET /`: which instance and release answered;
//! - `GET /health`: 200, or 500 when $FAIL_HEALTH is set (to try a failing
//!   deploy) or after `GET /fail` (until `GET /recover`);
//! - `GET /env/NAME`: the value of the environment variable NAME (to see secrets arrive);
//! - `GET /peer`: the address the request came from, as this instance sees it;
//! - `GET /headers`: the request's headers, one per line;
//! - `GET /call/IP:PORT/PATH`: makes `GET /PATH` to IP:PORT itself and
//!   answers with what it got (to see instances reach each other, and the world);
//! - `GET /bytes/N`: N bytes, streamed; `POST /echo`: the request body back,
//!   streamed as it arrives (to see large bodies cross a proxy);
//! - `GET /sleep/MS`: answers after MS milliseconds (to see concurrency limits);
//! - `GET /ws`: a WebSocket that echoes every message;
//! - `GET /crash`: exits with code 3 (to see an instance restarted).
//! Every request is logged to stdout. With $IGNORE_SIGTERM set, it ignores
//! SIGTERM (to see a stop take the app's whole kill_timeout).
//!
//! `hello check` is a health check for engines that run one inside the
//! container (a Docker `HEALTHCHECK`, Swarm's `--health-cmd`): it asks
//! `GET /health` of the server on $PORT and exits 0 on a 200, else 1.
//! `hello lines N` prints `line 1` to `line N`, then one line of 10,000
//! `x`, and exits 0 (to see a release command's output bounded).
//! `hello sleep S` waits S seconds and exits 0 (a slow build step, to see
//! builds queue).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Set by `GET /fail`: the health check fails until `GET /recover`.
static FAILING: AtomicBool = AtomicBool::new(false);

extern "C" {
    /// libc's signal(2); the binary links libc statically anyway.
    fn signal(signum: i32, handler: usize) -> usize;
}

fn main() {
    if std::env::var_os("IGNORE_SIGTERM").is_some() {
        const SIGTERM: i32 = 15;
        const SIG_IGN: usize = 1;
        // SAFETY: called before any thread starts; SIG_IGN is a valid disposition.
        unsafe { signal(SIGTERM, SIG_IGN) };
    }
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    if std::env::args().nth(1).as_deref() == Some("check") {
        std::process::exit(if check(&port) { 0 } else { 1 });
    }
    if std::env::args().nth(1).as_deref() == Some("sleep") {
        let seconds: u64 = std::env::args().nth(2).and_then(|n| n.parse().ok()).unwrap_or(0);
        std::thread::sleep(Duration::from_secs(seconds));
        std::process::exit(0);
    }
    if std::env::args().nth(1).as_deref() == Some("lines") {
        let count: u64 = std::env::args().nth(2).and_then(|n| n.parse().ok()).unwrap_or(0);
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        for i in 1..=count {
            let _ = writeln!(out, "line {i}");
        }
        let _ = writeln!(out, "{}", "x".repeat(10_000));
        std::process::exit(0);
    }
    let listener = match TcpListener::bind(format!("0.0.0.0:{port}")) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("cannot listen on port {port}: {e}");
            std::process::exit(1);
        }
    };
    println!("hello: listening on port {port}");
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = serve(stream);
        });
    }
}

/// Whether `GET /health` on this container's own port answers 200.
fn check(port: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(format!("127.0.0.1:{port}")) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut status = String::new();
    let _ = BufReader::new(stream).read_line(&mut status);
    status.split_whitespace().nth(1) == Some("200")
}

/// One request's head.
struct Head {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn wants_close(&self) -> bool {
        self.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

fn read_head(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Head>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("GET").to_owned();
    let path = parts.next().unwrap_or("/").to_owned();
    let mut headers = Vec::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    Ok(Some(Head { method, path, headers }))
}

fn serve(stream: TcpStream) -> std::io::Result<()> {
    let peer = stream.peer_addr()?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    while let Some(head) = read_head(&mut reader)? {
        let close = head.wants_close();
        if !respond(&head, &mut reader, &mut writer, peer)? || close {
            break;
        }
    }
    Ok(())
}

/// One write for head and body: two small writes would wait on Nagle.
fn send(writer: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let answer =
        format!("HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    writer.write_all(answer.as_bytes())
}

/// Answers one request; false when the connection must close.
fn respond(head: &Head, reader: &mut BufReader<TcpStream>, writer: &mut TcpStream, peer: SocketAddr) -> std::io::Result<bool> {
    let path = head.path.as_str();
    println!("{} {path}", head.method);
    if head.method == "POST" && path == "/echo" {
        return echo(head, reader, writer);
    }
    // Bodies of other requests are read and dropped, so the next request
    // on the connection starts where it should.
    drain_body(head, reader)?;
    let env = |name: &str| std::env::var(name).unwrap_or_default();
    let (status, body) = match path {
        "/health" if std::env::var_os("FAIL_HEALTH").is_some() || FAILING.load(Ordering::SeqCst) => {
            ("500 Internal Server Error", "unhealthy\n".into())
        }
        "/health" => ("200 OK", "ok\n".into()),
        "/fail" => {
            FAILING.store(true, Ordering::SeqCst);
            ("200 OK", "failing from now on\n".into())
        }
        "/recover" => {
            FAILING.store(false, Ordering::SeqCst);
            ("200 OK", "healthy again\n".into())
        }
        "/peer" => ("200 OK", format!("{}\n", peer.ip())),
        "/headers" => ("200 OK", head.headers.iter().map(|(k, v)| format!("{}: {v}\n", k.to_ascii_lowercase())).collect()),
        "/crash" => {
            println!("GET /crash: exiting with code 3");
            std::process::exit(3);
        }
        "/ws" => return websocket(head, reader, writer),
        p if p.starts_with("/bytes/") => {
            let count: u64 = p[7..].parse().unwrap_or(0);
            let head = format!("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {count}\r\n\r\n");
            writer.write_all(head.as_bytes())?;
            let chunk = [b'x'; 65536];
            let mut left = count;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                writer.write_all(&chunk[..n])?;
                left -= n as u64;
            }
            return Ok(true);
        }
        p if p.starts_with("/sleep/") => {
            let ms: u64 = p[7..].parse().unwrap_or(0);
            std::thread::sleep(Duration::from_millis(ms));
            ("200 OK", format!("slept {ms} ms\n"))
        }
        p if p.starts_with("/call/") => match call(&p[6..]) {
            Ok(answer) => ("200 OK", answer),
            Err(e) => ("502 Bad Gateway", format!("{e}\n")),
        },
        p if p.starts_with("/env/") => match std::env::var(&p[5..]) {
            Ok(value) => ("200 OK", value),
            Err(_) => ("404 Not Found", format!("{} is not set\n", &p[5..])),
        },
        _ => (
            "200 OK",
            format!(
                "Hello from {} (instance {}, release v{}, group {})\n",
                env("ROOST_APP_NAME"),
                env("ROOST_INSTANCE_ID"),
                env("ROOST_RELEASE"),
                env("ROOST_PROCESS_GROUP")
            ),
        ),
    };
    send(writer, status, &body)?;
    Ok(true)
}

/// The request body, in pieces as they arrive: Content-Length or chunked.
fn body_pieces(
    head: &Head,
    reader: &mut BufReader<TcpStream>,
    mut each: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut buffer = vec![0u8; 65536];
    if head.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
            if size == 0 {
                let mut end = String::new();
                reader.read_line(&mut end)?;
                return Ok(());
            }
            let mut left = size;
            while left > 0 {
                let n = reader.read(&mut buffer[..left.min(65536)])?;
                if n == 0 {
                    return Ok(());
                }
                each(&buffer[..n])?;
                left -= n;
            }
            let mut crlf = [0u8; 2];
            reader.read_exact(&mut crlf)?;
        }
    }
    let mut left: u64 = head.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    while left > 0 {
        let n = reader.read(&mut buffer[..left.min(65536) as usize])?;
        if n == 0 {
            break;
        }
        each(&buffer[..n])?;
        left -= n as u64;
    }
    Ok(())
}

fn drain_body(head: &Head, reader: &mut BufReader<TcpStream>) -> std::io::Result<()> {
    body_pieces(head, reader, |_| Ok(()))
}

/// Streams the body back as it arrives, chunked.
fn echo(head: &Head, reader: &mut BufReader<TcpStream>, writer: &mut TcpStream) -> std::io::Result<bool> {
    writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n")?;
    body_pieces(head, reader, |piece| {
        writer.write_all(format!("{:x}\r\n", piece.len()).as_bytes())?;
        writer.write_all(piece)?;
        writer.write_all(b"\r\n")
    })?;
    writer.write_all(b"0\r\n\r\n")?;
    Ok(true)
}

/// A WebSocket (RFC 6455) that echoes text and binary messages.
fn websocket(head: &Head, reader: &mut BufReader<TcpStream>, writer: &mut TcpStream) -> std::io::Result<bool> {
    let Some(key) = head.header("sec-websocket-key") else {
        send(writer, "400 Bad Request", "not a WebSocket request\n")?;
        return Ok(true);
    };
    let accept = base64(&sha1(format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes()));
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    writer.write_all(answer.as_bytes())?;
    loop {
        let mut first = [0u8; 2];
        if reader.read_exact(&mut first).is_err() {
            return Ok(false);
        }
        let opcode = first[0] & 0x0f;
        let masked = first[1] & 0x80 != 0;
        let mut length = u64::from(first[1] & 0x7f);
        if length == 126 {
            let mut bytes = [0u8; 2];
            reader.read_exact(&mut bytes)?;
            length = u64::from(u16::from_be_bytes(bytes));
        } else if length == 127 {
            let mut bytes = [0u8; 8];
            reader.read_exact(&mut bytes)?;
            length = u64::from_be_bytes(bytes);
        }
        let mut mask = [0u8; 4];
        if masked {
            reader.read_exact(&mut mask)?;
        }
        let mut payload = vec![0u8; length as usize];
        reader.read_exact(&mut payload)?;
        if masked {
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= mask[i % 4];
            }
        }
        match opcode {
            0x8 => {
                writer.write_all(&[0x88, 0])?;
                return Ok(false);
            }
            0x9 => frame(writer, 0xA, &payload)?,
            0x1 | 0x2 => frame(writer, opcode, &payload)?,
            _ => {}
        }
    }
}

fn frame(writer: &mut TcpStream, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut out = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n < 65536 => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    writer.write_all(&out)
}

/// SHA-1, only for the WebSocket handshake.
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    let mut message = data.to_vec();
    let bits = (data.len() as u64).wrapping_mul(8);
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&bits.to_be_bytes());
    for block in message.chunks(64) {
        let mut w = [0u32; 80];
        for i in 0..16 {
            w[i] = u32::from_be_bytes([block[4 * i], block[4 * i + 1], block[4 * i + 2], block[4 * i + 3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, word) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A827999),
                20..=39 => (b ^ c ^ d, 0x6ED9EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let next = a.rotate_left(5).wrapping_add(f).wrapping_add(e).wrapping_add(k).wrapping_add(*word);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = next;
        }
        for (slot, value) in h.iter_mut().zip([a, b, c, d, e]) {
            *slot = slot.wrapping_add(value);
        }
    }
    let mut out = [0u8; 20];
    for (i, word) in h.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&word.to_be_bytes());
    }
    out
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `GET /PATH` to the IP:PORT that `target` ("IP:PORT/PATH") starts with;
/// the answer's status line and body.
fn call(target: &str) -> Result<String, String> {
    let (address, path) = target.split_once('/').unwrap_or((target, ""));
    let address: SocketAddr = address.parse().map_err(|_| format!("'{address}' is not IP:PORT"))?;
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(3))
        .map_err(|e| format!("cannot connect to {address}: {e}"))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!("GET /{path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(|e| format!("{address}: {e}"))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(|e| format!("{address}: {e}"))?;
    let status = answer.lines().next().unwrap_or_default().to_owned();
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    Ok(format!("{status}\n{body}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_websocket_accept_key_matches_the_rfc_example() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
        assert_eq!(super::base64(&super::sha1(key.as_bytes())), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }
}
