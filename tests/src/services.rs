//! Private PostgreSQL and RabbitMQ servers for the tests that restart a service: each
//! is a server process of the machine's own installation, started on free ports with
//! its data in a temporary folder, stopped and started again through the server's own
//! control program (`pg_ctl`, `rabbitmqctl`), and removed when dropped. The shared
//! services stay untouched, so the tests that restart one still run beside the rest.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A port nobody listens on at the moment of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("harness: a free port")
        .port()
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

async fn wait_for_port(what: &str, port: u16, open: bool, limit: Duration) {
    let deadline = Instant::now() + limit;
    while port_open(port) != open {
        assert!(
            Instant::now() < deadline,
            "harness: {what} on port {port} did not {} within {limit:?}",
            if open { "come up" } else { "go down" }
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn temp_dir(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "refreshd-{kind}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    ));
    std::fs::create_dir_all(&dir).expect("harness: create a private server's folder");
    dir
}

fn run(what: &str, command: &mut Command) {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("harness: run {what}: {error}"));
    assert!(
        output.status.success(),
        "harness: {what} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Whether this process runs as root (PostgreSQL's programs refuse to).
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A private PostgreSQL cluster (`initdb`, `pg_ctl`), trust authentication for
/// `postgres` on 127.0.0.1, with a `refreshd` database.
pub struct PrivatePostgres {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

impl PrivatePostgres {
    /// The newest installed PostgreSQL's programs (`/usr/lib/postgresql/{v}/bin`).
    fn bin() -> PathBuf {
        let root = Path::new("/usr/lib/postgresql");
        let mut versions: Vec<u32> = std::fs::read_dir(root)
            .expect("harness: PostgreSQL is installed (run `make services`)")
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        versions.sort_unstable();
        let version = versions.last().expect("harness: a PostgreSQL version");
        root.join(version.to_string()).join("bin")
    }

    /// `program args…`, as the `postgres` user when this process is root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    pub async fn start() -> Self {
        let dir = temp_dir("pg");
        let server = Self {
            port: free_port(),
            dir,
            bin: Self::bin(),
        };
        if is_root() {
            run(
                "chown of the private cluster's folder",
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&server.dir),
            );
        }
        run(
            "initdb",
            server
                .command("initdb")
                .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
                .arg(server.data()),
        );
        server.pg_ctl("start").await;
        run(
            "createdb refreshd",
            server.command("createdb").args([
                "-h",
                "127.0.0.1",
                "-p",
                &server.port.to_string(),
                "-U",
                "postgres",
                "refreshd",
            ]),
        );
        server
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The database URL of its `refreshd` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/refreshd", self.port)
    }

    async fn pg_ctl(&self, action: &str) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir.display()
        );
        let mut command = self.command("pg_ctl");
        command
            .args(["-D"])
            .arg(self.data())
            .args(["-m", "fast", "-w", "-l"])
            .arg(self.dir.join("log"))
            .args(["-o", &options, action]);
        let what = format!("pg_ctl {action}");
        tokio::task::spawn_blocking(move || run(&what, &mut command))
            .await
            .expect("harness: pg_ctl's thread");
        wait_for_port(
            "PostgreSQL",
            self.port,
            action != "stop",
            Duration::from_secs(30),
        )
        .await;
    }

    /// Stops the server (`pg_ctl stop -m fast`: every session is ended).
    pub async fn stop(&self) {
        self.pg_ctl("stop").await;
    }

    /// Starts it again on the same data and port.
    pub async fn start_again(&self) {
        self.pg_ctl("start").await;
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["-D"])
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private RabbitMQ node (`rabbitmq-server`, `rabbitmqctl`) on 127.0.0.1, guest
/// allowed from there, no plugins, its own Erlang node name and cookie.
pub struct PrivateRabbit {
    pub port: u16,
    dir: PathBuf,
    node: String,
    dist_port: u16,
    /// The running `rabbitmq-server`, reaped when it stops.
    server: std::sync::Mutex<Option<std::process::Child>>,
}

/// Where Debian installs RabbitMQ's scripts (the ones in `/usr/sbin` switch user).
const RABBIT_BIN: &str = "/usr/lib/rabbitmq/bin";

impl PrivateRabbit {
    pub async fn start() -> Self {
        let dir = temp_dir("rabbit");
        let port = free_port();
        let server = Self {
            port,
            node: format!(
                "refreshd_test_{}@localhost",
                dir.file_name()
                    .and_then(|name| name.to_str())
                    .and_then(|name| name.rsplit('-').next())
                    .expect("harness: the folder's suffix")
            ),
            dist_port: free_port(),
            dir,
            server: std::sync::Mutex::new(None),
        };
        std::fs::write(
            server.dir.join("rabbitmq.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n"),
        )
        .expect("harness: write the private node's configuration");
        std::fs::write(server.dir.join("enabled_plugins"), "[].\n")
            .expect("harness: write the private node's plugins");
        server.start_again().await;
        server
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(Path::new(RABBIT_BIN).join(program));
        command
            .env("HOME", &self.dir)
            .env("RABBITMQ_CONF_ENV_FILE", "/dev/null")
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq.conf"));
        command
    }

    /// The AMQP URL of its default vhost.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Starts the node (on its data of before, if any) and waits until it listens.
    pub async fn start_again(&self) {
        let log = std::fs::File::create(self.dir.join("server.out"))
            .expect("harness: the private node's output");
        let child = self
            .command("rabbitmq-server")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("harness: the node's output"))
            .stderr(log)
            .spawn()
            .expect("harness: start rabbitmq-server (run `make services`)");
        *self.server.lock().expect("harness: the node's process") = Some(child);
        wait_for_port("RabbitMQ", self.port, true, Duration::from_secs(90)).await;
    }

    /// Stops the node (`rabbitmqctl stop`: the broker shuts down, every connection
    /// is closed) and waits until its port is closed.
    pub async fn stop(&self) {
        let mut command = self.command("rabbitmqctl");
        command.args(["-n", &self.node, "stop"]);
        tokio::task::spawn_blocking(move || run("rabbitmqctl stop", &mut command))
            .await
            .expect("harness: rabbitmqctl's thread");
        wait_for_port("RabbitMQ", self.port, false, Duration::from_secs(30)).await;
        self.reap();
    }

    fn reap(&self) {
        if let Some(mut child) = self
            .server
            .lock()
            .expect("harness: the node's process")
            .take()
        {
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        if port_open(self.port) {
            let _ = self
                .command("rabbitmqctl")
                .args(["-n", &self.node, "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        self.reap();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Restarts one of the machine's shared services through its service manager
/// (`service {name} restart`, with `sudo` when not root) and waits until `port`
/// answers again. Only for the tests that `make test` runs alone, after the rest
/// (they are `#[ignore]`d in the parallel run).
pub async fn restart_shared_service(name: &str, port: u16) {
    let mut command = if is_root() {
        Command::new("service")
    } else {
        let mut sudo = Command::new("sudo");
        sudo.args(["-n", "service"]);
        sudo
    };
    command.args([name, "restart"]);
    let what = format!("service {name} restart");
    tokio::task::spawn_blocking(move || run(&what, &mut command))
        .await
        .expect("harness: the service manager's thread");
    wait_for_port(name, port, true, Duration::from_secs(90)).await;
}
