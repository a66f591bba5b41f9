//! `residency-gateway-healthcheck [URL]`: GET `URL` (default `http://127.0.0.1:9090/healthz`, or the
//! `HEALTHCHECK_URL` environment variable) over plain HTTP/1.0 and exit 0 when the status is 200, 1
//! otherwise, printing one line either way. Connect, write and read are bounded by a 3-second timeout
//! each, so a hung gateway fails the check instead of hanging it.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

const DEFAULT_URL: &str = "http://127.0.0.1:9090/healthz";
const TIMEOUT: Duration = Duration::from_secs(3);

/// Splits `http://host:port/path` into the address to connect to, the Host header and the path.
fn parse(url: &str) -> Result<(String, String, String), String> {
    let rest =
        url.strip_prefix("http://").ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("{url}: no host"));
    }
    let has_port = match authority.rfind(':') {
        Some(i) => !authority[i..].contains(']'),
        None => false,
    };
    let addr = if has_port { authority.to_string() } else { format!("{authority}:80") };
    Ok((addr, authority.to_string(), path.to_string()))
}

fn check(url: &str) -> Result<String, String> {
    let (addr, host, path) = parse(url)?;
    let target = addr
        .to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))?;
    let mut stream = TcpStream::connect_timeout(&target, TIMEOUT).map_err(|e| format!("{addr}: {e}"))?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: residency-gateway-healthcheck\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).map_err(|e| format!("{addr}: {e}"))?;
    // The status line is all we need; read at most 4 KiB.
    let mut buf = Vec::with_capacity(512);
    stream.take(4096).read_to_end(&mut buf).map_err(|e| format!("{addr}: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let status_line = text.lines().next().unwrap_or("").trim().to_string();
    let code = status_line.split_whitespace().nth(1).unwrap_or("");
    if code == "200" { Ok(status_line) } else { Err(format!("{url}: {status_line}")) }
}

fn main() -> ExitCode {
    let url = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("HEALTHCHECK_URL").ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| DEFAULT_URL.to_string());
    match check(&url) {
        Ok(status) => {
            println!("ok: {url}: {status}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("unhealthy: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_urls() {
        assert_eq!(
            parse("http://127.0.0.1:9090/healthz").unwrap(),
            ("127.0.0.1:9090".into(), "127.0.0.1:9090".into(), "/healthz".into())
        );
        assert_eq!(
            parse("http://localhost").unwrap(),
            ("localhost:80".into(), "localhost".into(), "/".into())
        );
        assert_eq!(parse("http://[::1]:9090/readyz").unwrap().0, "[::1]:9090");
        assert_eq!(parse("http://[::1]/").unwrap().0, "[::1]:80");
        assert!(parse("https://x/").is_err());
        assert!(parse("http:///x").is_err());
    }
}
