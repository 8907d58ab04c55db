//! A TCP proxy in front of a real service, so a test can make the service "go down"
//! for a running process (cut every connection, refuse new ones) and come back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Forwards 127.0.0.1:{port} to `target` until dropped.
pub struct Proxy {
    pub port: u16,
    accepting: Arc<AtomicBool>,
    generation: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl Proxy {
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy: bind");
        let port = listener.local_addr().expect("proxy: address").port();
        let accepting = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let target = target.to_owned();
        let (accepting_loop, generation_loop, stop_loop) =
            (accepting.clone(), generation.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = stop_loop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((mut inbound, _)) = accepted else {
                    continue;
                };
                if !accepting_loop.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let cut = generation_loop.lock().expect("proxy lock").child_token();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        () = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Self {
            port,
            accepting,
            generation,
            stop,
        }
    }

    /// Closes every proxied connection now.
    pub fn cut(&self) {
        let mut generation = self.generation.lock().expect("proxy lock");
        generation.cancel();
        *generation = CancellationToken::new();
    }

    /// Whether new connections are let through.
    pub fn accept(&self, accepting: bool) {
        self.accepting.store(accepting, Ordering::SeqCst);
    }

    /// Down: cut everything and refuse new connections.
    pub fn down(&self) {
        self.accept(false);
        self.cut();
    }

    pub fn up(&self) {
        self.accept(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut();
    }
}
