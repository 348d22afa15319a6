//! A TCP proxy a test can switch off, to make a service it stands in front of unreachable
//! (connections refused at once, open ones cut) and then reachable again, without losing the
//! service's state.

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::Error;

pub struct ToggleProxy {
    address: String,
    up: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl ToggleProxy {
    /// Listens on a free loopback port and forwards to `upstream` (`host:port`) while up.
    pub fn start(upstream: &str) -> Result<ToggleProxy, Error> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|source| Error::Io {
            what: "binding the proxy".into(),
            source,
        })?;
        let address = listener
            .local_addr()
            .map_err(|source| Error::Io {
                what: "the proxy's address".into(),
                source,
            })?
            .to_string();
        let up = Arc::new(AtomicBool::new(true));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (accept_up, accept_open, upstream) =
            (Arc::clone(&up), Arc::clone(&open), upstream.to_string());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !accept_up.load(Ordering::Acquire) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                if let Ok(mut open) = accept_open.lock() {
                    open.extend(client.try_clone().ok());
                    open.extend(server.try_clone().ok());
                }
                pump(&client, &server);
                pump(&server, &client);
            }
        });
        Ok(ToggleProxy { address, up, open })
    }

    /// `host:port` to connect to.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Cuts every open connection and refuses new ones.
    pub fn down(&self) {
        self.up.store(false, Ordering::Release);
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        for stream in open.drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    pub fn up(&self) {
        self.up.store(true, Ordering::Release);
    }
}

/// Copies `from` to `to` on a thread until either side closes.
fn pump(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let _: io::Result<u64> = io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

/// A proxy that answers the first requests itself with the given statuses (each with
/// `Retry-After: 1`, then closing the connection), and forwards every later connection to
/// `upstream`: a server that is rate limited, then unavailable, then well.
pub struct FaultyProxy {
    address: String,
    /// Requests answered with a fault so far.
    faults_sent: Arc<std::sync::atomic::AtomicUsize>,
}

impl FaultyProxy {
    pub fn start(upstream: &str, faults: &[u16]) -> Result<FaultyProxy, Error> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|source| Error::Io {
            what: "binding the proxy".into(),
            source,
        })?;
        let address = listener
            .local_addr()
            .map_err(|source| Error::Io {
                what: "the proxy's address".into(),
                source,
            })?
            .to_string();
        let faults_sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (sent, faults, upstream) = (
            Arc::clone(&faults_sent),
            faults.to_vec(),
            upstream.to_string(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { continue };
                let n = sent.load(Ordering::Acquire);
                if let Some(status) = faults.get(n) {
                    sent.fetch_add(1, Ordering::AcqRel);
                    answer_with(&mut client, *status);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                pump(&client, &server);
                pump(&server, &client);
            }
        });
        Ok(FaultyProxy {
            address,
            faults_sent,
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn faults_sent(&self) -> usize {
        self.faults_sent.load(Ordering::Acquire)
    }
}

/// Reads one request (headers and a `Content-Length` body) and answers `status`, closing.
fn answer_with(client: &mut TcpStream, status: u16) {
    use std::io::{BufRead, BufReader, Read, Write};
    let _ = client.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let Ok(reader_stream) = client.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(reader_stream);
    let mut length = 0usize;
    let mut origin = None;
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|read| read > 0) {
        let header = line.trim_end().to_ascii_lowercase();
        if header.is_empty() {
            break;
        }
        if let Some(value) = header.strip_prefix("content-length:") {
            length = value.trim().parse().unwrap_or(0);
        }
        if header.starts_with("origin:") {
            origin = line
                .trim_end()
                .split_once(':')
                .map(|(_, o)| o.trim().to_string());
        }
        line.clear();
    }
    let mut body = vec![0u8; length.min(64 << 20)];
    let _ = reader.read_exact(&mut body);
    let reason = if status == 429 {
        "Too Many Requests"
    } else {
        "Service Unavailable"
    };
    // As the server would, CORS headers for a browser's request, so the page sees the status.
    let cors = origin.map_or_else(String::new, |origin| {
        format!("Access-Control-Allow-Origin: {origin}\r\nAccess-Control-Expose-Headers: Retry-After\r\n")
    });
    let reply = format!(
        "HTTP/1.1 {status} {reason}\r\nRetry-After: 1\r\n{cors}Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    let _ = client.write_all(reply.as_bytes());
    let _ = client.shutdown(Shutdown::Both);
}
