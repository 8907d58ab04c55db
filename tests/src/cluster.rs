//! Real local Redis processes of a test's own: a Redis Cluster of three masters
//! (`redis-server` processes on free ports, each in its own folder under a temp dir),
//! joined with `redis-cli --cluster create`, or one standalone server; killed and
//! removed when dropped, also when the test panics.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest wait for the cluster to form (nodes up, slots assigned, state ok).
const FORM_TIMEOUT: Duration = Duration::from_secs(30);

/// A running three-master cluster.
pub struct RedisCluster {
    dir: PathBuf,
    nodes: Vec<Node>,
}

struct Node {
    port: u16,
    child: Option<Child>,
}

/// A port whose cluster-bus port (+10000) is free too.
fn free_port() -> u16 {
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("harness: a free port");
        let port = listener
            .local_addr()
            .expect("harness: the port's address")
            .port();
        let Some(bus) = port.checked_add(10_000) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", bus)).is_ok() {
            return port;
        }
    }
}

fn run(command: &mut Command) -> std::process::Output {
    command.output().unwrap_or_else(|e| {
        panic!(
            "harness: cannot run {:?} ({e}); Redis comes with `make services`",
            command.get_program()
        )
    })
}

impl RedisCluster {
    /// Starts three masters and forms the cluster; panics (with their logs) if it
    /// does not come up.
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "refreshd-cluster-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("harness: the cluster's folder");
        let mut cluster = Self {
            dir,
            nodes: Vec::new(),
        };
        for _ in 0..3 {
            let port = free_port();
            let child = cluster.spawn(port);
            cluster.nodes.push(Node {
                port,
                child: Some(child),
            });
        }
        for node in &cluster.nodes {
            cluster.wait_for(node.port, "PONG", &["PING"]).await;
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = run(Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null()));
        assert!(
            created.status.success(),
            "harness: redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
        for node in &cluster.nodes {
            cluster
                .wait_for(node.port, "cluster_state:ok", &["CLUSTER", "INFO"])
                .await;
        }
        cluster
    }

    fn spawn(&self, port: u16) -> Child {
        spawn(&self.dir, port, true)
    }

    async fn wait_for(&self, port: u16, expected: &str, command: &[&str]) {
        wait_for(&self.dir, port, expected, command).await;
    }

    /// The seed nodes, as `redis.cluster_nodes` takes them.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// `CONFIG SET name value` on every node.
    pub fn config_set(&self, name: &str, value: &str) {
        for node in &self.nodes {
            if node.child.is_some() {
                config_set(node.port, name, value);
            }
        }
    }

    /// Kills every node (SIGKILL): the cluster is gone, its ports closed.
    pub fn kill(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Adds a replica of master `index` (a fourth node, or more) and waits until it
    /// has synchronised; returns its index.
    pub async fn add_replica(&mut self, index: usize) -> usize {
        let master = self.nodes[index].port;
        let id = run(Command::new("redis-cli")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &master.to_string(),
                "CLUSTER",
                "MYID",
            ])
            .stdin(Stdio::null()));
        let id = String::from_utf8_lossy(&id.stdout).trim().to_owned();
        let port = free_port();
        let child = self.spawn(port);
        self.nodes.push(Node {
            port,
            child: Some(child),
        });
        self.wait_for(port, "PONG", &["PING"]).await;
        let added = run(Command::new("redis-cli")
            .arg("--cluster")
            .arg("add-node")
            .arg(format!("127.0.0.1:{port}"))
            .arg(format!("127.0.0.1:{master}"))
            .args(["--cluster-slave", "--cluster-master-id", &id])
            .stdin(Stdio::null()));
        assert!(
            added.status.success(),
            "harness: redis-cli --cluster add-node failed: {}{}",
            String::from_utf8_lossy(&added.stdout),
            String::from_utf8_lossy(&added.stderr)
        );
        self.wait_for(port, "master_link_status:up", &["INFO", "replication"])
            .await;
        for node in &self.nodes {
            self.wait_for(node.port, "cluster_state:ok", &["CLUSTER", "INFO"])
                .await;
        }
        self.nodes.len() - 1
    }

    /// Kills node `index` (SIGKILL) and leaves it down.
    pub fn kill_node(&mut self, index: usize) {
        if let Some(mut child) = self.nodes[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until node `index` is a master (after a failover promoted it).
    pub async fn wait_until_master(&self, index: usize) {
        self.wait_for(
            self.nodes[index].port,
            "role:master",
            &["INFO", "replication"],
        )
        .await;
    }

    /// Kills node `index` and starts it again on its port and folder: it rejoins
    /// with its `nodes.conf` (same id, same slots), its data lost.
    pub async fn restart_node(&mut self, index: usize) {
        let port = self.nodes[index].port;
        if let Some(mut child) = self.nodes[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let child = self.spawn(port);
        self.nodes[index].child = Some(child);
        for node in &self.nodes {
            self.wait_for(node.port, "cluster_state:ok", &["CLUSTER", "INFO"])
                .await;
        }
    }
}

/// `redis-server` on `port`, in its own folder under `dir`, without persistence.
fn spawn(dir: &std::path::Path, port: u16, cluster: bool) -> Child {
    let node_dir = dir.join(port.to_string());
    std::fs::create_dir_all(&node_dir).expect("harness: a node's folder");
    let log = std::fs::File::create(node_dir.join("redis.log")).expect("harness: node log");
    let mut command = Command::new("redis-server");
    command.args(["--port", &port.to_string(), "--bind", "127.0.0.1"]);
    if cluster {
        command
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--cluster-node-timeout", "2000"]);
    }
    command
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(&node_dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("harness: cannot start redis-server ({e}); it comes with `make services`")
        })
}

/// Waits until the node on `port` answers `command` with `expected`; panics with its
/// log after [`FORM_TIMEOUT`].
async fn wait_for(dir: &std::path::Path, port: u16, expected: &str, command: &[&str]) {
    let deadline = Instant::now() + FORM_TIMEOUT;
    loop {
        let answer = run(Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(command)
            .stdin(Stdio::null()));
        if String::from_utf8_lossy(&answer.stdout).contains(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "harness: redis node {port} did not answer {expected:?} to {command:?}; its log:\n{}",
            std::fs::read_to_string(dir.join(port.to_string()).join("redis.log"))
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `CONFIG SET name value` on the node on `port`.
fn config_set(port: u16, name: &str, value: &str) {
    let answer = run(Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["CONFIG", "SET", name, value])
        .stdin(Stdio::null()));
    assert!(
        String::from_utf8_lossy(&answer.stdout).contains("OK"),
        "harness: CONFIG SET {name} {value} on redis node {port}: {}{}",
        String::from_utf8_lossy(&answer.stdout),
        String::from_utf8_lossy(&answer.stderr)
    );
}

/// One standalone `redis-server` of a test's own, for a test that changes the
/// server's settings (which the shared Redis of every other test must keep).
pub struct RedisServer {
    dir: PathBuf,
    node: Node,
}

impl RedisServer {
    /// Starts it and waits until it answers.
    pub async fn start() -> Self {
        let dir =
            std::env::temp_dir().join(format!("refreshd-redis-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("harness: the server's folder");
        let port = free_port();
        let child = spawn(&dir, port, false);
        wait_for(&dir, port, "PONG", &["PING"]).await;
        Self {
            dir,
            node: Node {
                port,
                child: Some(child),
            },
        }
    }

    /// Its address, as `redis.url` takes it.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.node.port)
    }

    /// `CONFIG SET name value` on it.
    pub fn config_set(&self, name: &str, value: &str) {
        config_set(self.node.port, name, value);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
