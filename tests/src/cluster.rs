//! A real local Redis Cluster for a test: three masters (`redis-server` processes on
//! free ports, each in its own folder under a temp dir), joined with `redis-cli
//! --cluster create`; killed and removed when dropped, also when the test panics.

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
        let node_dir = self.dir.join(port.to_string());
        std::fs::create_dir_all(&node_dir).expect("harness: a node's folder");
        let log = std::fs::File::create(node_dir.join("redis.log")).expect("harness: node log");
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--cluster-node-timeout", "2000"])
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

    async fn wait_for(&self, port: u16, expected: &str, command: &[&str]) {
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
                std::fs::read_to_string(self.dir.join(port.to_string()).join("redis.log"))
                    .unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The seed nodes, as `redis.cluster_nodes` takes them.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
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

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
