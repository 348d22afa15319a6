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
