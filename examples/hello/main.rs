//! hello: the example app Roost deploys, and the app its tests deploy.
//!
//! A tiny HTTP server with no dependencies, so it builds into one static
//! binary that runs in a `FROM scratch` image (no registry needed):
//!
//!     rustc -O -C target-feature=+crt-static --target x86_64-unknown-linux-gnu main.rs -o hello
//!
//! It answers on $PORT (8080 by default):
//! - `GET /`: which instance and release answered;
//! - `GET /health`: 200, or 500 when $FAIL_HEALTH is set (to try a failing
//!   deploy) or after `GET /fail` (until `GET /recover`);
//! - `GET /env/NAME`: the value of the environment variable NAME (to see secrets arrive);
//! - `GET /peer`: the address the request came from, as this instance sees it;
//! - `GET /call/IP:PORT/PATH`: makes `GET /PATH` to IP:PORT itself and
//!   answers with what it got (to see instances reach each other, and the world);
//! - `GET /crash`: exits with code 3 (to see an instance restarted).
//! Every request is logged to stdout.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Set by `GET /fail`: the health check fails until `GET /recover`.
static FAILING: AtomicBool = AtomicBool::new(false);

fn main() {
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    let listener = match TcpListener::bind(format!("0.0.0.0:{port}")) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("cannot listen on port {port}: {e}");
            std::process::exit(1);
        }
    };
    println!("hello: listening on port {port}");
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || serve(stream));
    }
}

fn serve(mut stream: TcpStream) {
    let mut line = String::new();
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    if reader.read_line(&mut line).is_err() {
        return;
    }
    // Read the headers; the body, if any, is ignored.
    let mut header = String::new();
    while reader.read_line(&mut header).map(|n| n > 2).unwrap_or(false) {
        header.clear();
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let env = |name: &str| std::env::var(name).unwrap_or_default();
    let (status, body) = match path.as_str() {
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
        "/peer" => match stream.peer_addr() {
            Ok(peer) => ("200 OK", format!("{}\n", peer.ip())),
            Err(e) => ("500 Internal Server Error", format!("{e}\n")),
        },
        p if p.starts_with("/call/") => match call(&p[6..]) {
            Ok(answer) => ("200 OK", answer),
            Err(e) => ("502 Bad Gateway", format!("{e}\n")),
        },
        "/crash" => {
            println!("GET /crash: exiting with code 3");
            std::process::exit(3);
        }
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
    println!("GET {path} {}", &status[..3]);
    let response =
        format!("HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    let _ = stream.write_all(response.as_bytes());
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
