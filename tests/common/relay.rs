//! A TCP relay the test controls: it forwards connections to a target, or refuses them (accept and
//! close at once), can cut every relayed connection, and can close its port for good (connections
//! are then refused by the kernel). Used to make Harbor "go away" and come back without fixed ports.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub struct Relay {
    pub addr: SocketAddr,
    forward: Arc<AtomicBool>,
    closing: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Starts relaying to `target`; `forward` says whether connections pass at first.
    pub fn start(target: SocketAddr, forward: bool) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let flag = Arc::new(AtomicBool::new(forward));
        let closing = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (f, o, c) = (flag.clone(), open.clone(), closing.clone());
        let thread = std::thread::spawn(move || {
            for client in listener.incoming() {
                if c.load(Ordering::SeqCst) {
                    return; // the listener is dropped: the port refuses from now on
                }
                let Ok(client) = client else { continue };
                if !f.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut o = o.lock().unwrap();
                    o.push(client.try_clone().unwrap());
                    o.push(server.try_clone().unwrap());
                }
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(server, client);
            }
        });
        Relay {
            addr,
            forward: flag,
            closing,
            open,
            thread: Some(thread),
        }
    }

    /// Closes the port and cuts every connection: from now on a connection is refused.
    pub fn close(&mut self) {
        self.closing.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which sees the flag and drops the listener.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.cut_all();
    }

    /// From now on, new connections are forwarded (true) or refused (false).
    pub fn set_forward(&self, yes: bool) {
        self.forward.store(yes, Ordering::SeqCst);
    }

    /// Cuts every connection relayed so far.
    pub fn cut_all(&self) {
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
