//! hello: the example app Roost deploys, and the app its tests deploy.
//!
//! A tiny HTTP server with no dependencies, so it builds into one static
//! binary that runs in a `FROM scratch` image (no registry needed):
//!
//!     rustc -O -C target-feature=+crt-static --target x86_64-unknown-linux-gnu main.rs -o hello
//!
//! It answers on $PORT (8080 by default):
//! - `GET /`: which instance and release answered;
//! - `GET /health`: 200, or 500 when $FAIL_HEALTH is set (to try a failing deploy);
//! - `GET /env/NAME`: the value of the environment variable NAME (to see secrets arrive);
//! - `GET /crash`: exits with code 3 (to see an instance restarted).
//! Every request is logged to stdout.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};

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
        "/health" if std::env::var_os("FAIL_HEALTH").is_some() => ("500 Internal Server Error", "unhealthy\n".into()),
        "/health" => ("200 OK", "ok\n".into()),
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
