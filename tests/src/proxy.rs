//! A TCP proxy in front of a real service, so a test can make the service "go down"
//! for a running process (cut every connection, refuse new ones) and come back, or
//! lose one answer with its connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How long the service has to act on the request whose answer is lost before its
/// connection is cut.
const LOST_ANSWER_CUT_AFTER: Duration = Duration::from_millis(500);

/// A one-shot fault ([`Proxy::lose_answer_after`]).
#[derive(Default)]
struct Trap {
    /// The bytes to wait for, and whether the write carrying them is let through
    /// with its answer (the one after it is the first whose answer is lost).
    needle: Mutex<Option<(Vec<u8>, bool)>>,
    sprung: AtomicBool,
}

/// Forwards 127.0.0.1:{port} to `target` until dropped.
pub struct Proxy {
    pub port: u16,
    accepting: Arc<AtomicBool>,
    generation: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
    trap: Arc<Trap>,
}

impl Proxy {
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy: bind");
        let port = listener.local_addr().expect("proxy: address").port();
        let accepting = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let trap = Arc::new(Trap::default());
        let target = target.to_owned();
        let (accepting_loop, generation_loop, stop_loop, trap_loop) = (
            accepting.clone(),
            generation.clone(),
            stop.clone(),
            trap.clone(),
        );
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = stop_loop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((inbound, _)) = accepted else {
                    continue;
                };
                if !accepting_loop.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let cut = generation_loop.lock().expect("proxy lock").child_token();
                let target = target.clone();
                let trap = trap_loop.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        () = cut.cancelled() => {}
                        () = pipe(inbound, outbound, &trap) => {}
                    }
                });
            }
        });
        Self {
            port,
            accepting,
            generation,
            stop,
            trap,
        }
    }

    /// Arms a one-shot fault: on the connection that next sends `needle`, the write
    /// after the one carrying it (the execution of a statement whose text is
    /// `needle`, once prepared) reaches the service, but everything the service
    /// answers from then on is dropped, and the connection is cut
    /// [`LOST_ANSWER_CUT_AFTER`] later.
    pub fn lose_answer_after(&self, needle: &[u8]) {
        self.arm(needle, true);
    }

    /// As [`Proxy::lose_answer_after`], but from the write carrying `needle` itself
    /// (a statement's preparation: it never runs).
    pub fn lose_answer_to(&self, needle: &[u8]) {
        self.arm(needle, false);
    }

    fn arm(&self, needle: &[u8], after: bool) {
        *self.trap.needle.lock().expect("proxy lock") = Some((needle.to_vec(), after));
        self.trap.sprung.store(false, Ordering::SeqCst);
    }

    /// Whether the fault armed by [`Proxy::lose_answer_after`] struck.
    pub fn answer_lost(&self) -> bool {
        self.trap.sprung.load(Ordering::SeqCst)
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

/// Copies both ways until either side closes, springing the [`Trap`] if armed.
async fn pipe(inbound: TcpStream, outbound: TcpStream, trap: &Trap) {
    let (mut from_client, mut to_client) = inbound.into_split();
    let (mut from_service, mut to_service) = outbound.into_split();
    let muted = AtomicBool::new(false);
    let upstream = async {
        let mut buffer = vec![0u8; 64 * 1024];
        let mut primed = false;
        loop {
            let n = match from_client.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let chunk = &buffer[..n];
            if !primed {
                let mut armed = trap.needle.lock().expect("proxy lock");
                if let Some((needle, after)) = armed.as_ref()
                    && chunk.windows(needle.len()).any(|w| w == needle.as_slice())
                {
                    primed = *after;
                    if !primed {
                        muted.store(true, Ordering::SeqCst);
                    }
                    *armed = None;
                }
            } else {
                muted.store(true, Ordering::SeqCst);
            }
            if muted.load(Ordering::SeqCst) {
                trap.sprung.store(true, Ordering::SeqCst);
            }
            if to_service.write_all(chunk).await.is_err() {
                return;
            }
            if muted.load(Ordering::SeqCst) {
                tokio::time::sleep(LOST_ANSWER_CUT_AFTER).await;
                return;
            }
        }
    };
    let downstream = async {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match from_service.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if !muted.load(Ordering::SeqCst) && to_client.write_all(&buffer[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = upstream => {}
        () = downstream => {}
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut();
    }
}
