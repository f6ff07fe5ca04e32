//! The mesh: every service as its own `sllm serve` process, workers as `sllm worker` processes.

use std::collections::BTreeMap;
use std::time::Duration;

use kvstore::{InstanceStatus, Store, StoreConfig, WorkerStatus};
use sllm_api::v1 as pb;
use sllm_integration_tests::{JOIN_SECRET, Proc, RedisServer, eventually};

/// Worker lease and heartbeat of the mesh's WorkerRegistry replicas.
pub const LEASE: Duration = Duration::from_millis(1500);
/// The Scaler's leader lease.
pub const SCALER_LEASE: Duration = Duration::from_millis(1000);

pub struct Mesh {
    pub redis: RedisServer,
    pub store: Store,
    procs: BTreeMap<String, Proc>,
    /// gRPC endpoint of each service process, by name.
    pub endpoints: BTreeMap<String, String>,
    workers: Vec<String>,
}

impl Drop for Mesh {
    /// A failed test shows what every process said.
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("SLLM_CHAOS_LOGS").is_some() {
            for (name, p) in &self.procs {
                for line in p.output().lines() {
                    eprintln!("[{name}] {line}");
                }
            }
        }
    }
}

impl Mesh {
    /// Model registry, two of each other service, `workers` simulated workers (2 GPUs each).
    pub async fn start(redis: RedisServer, workers: usize) -> Mesh {
        let store =
            Store::connect(StoreConfig::new(redis.url()).with_namespace("sllm")).await.unwrap();
        let mut mesh = Mesh {
            redis,
            store,
            procs: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            workers: Vec::new(),
        };
        mesh.serve("models", "model-registry", &[]);
        for r in ["wr-a", "wr-b"] {
            mesh.serve(
                r,
                "worker-registry",
                &["--lease-ms", &LEASE.as_millis().to_string(), "--heartbeat-ms", "300"],
            );
        }
        for s in ["scaler-a", "scaler-b"] {
            mesh.serve(
                s,
                "scaler",
                &[
                    "--scaler-lease-ms",
                    &SCALER_LEASE.as_millis().to_string(),
                    "--scaler-tick-ms",
                    "200",
                ],
            );
        }
        for d in ["dispatch-a", "dispatch-b"] {
            mesh.serve(d, "dispatch", &["--openai-addr", "127.0.0.1:0", "--max-queue", "1024"]);
        }
        for i in 0..workers {
            mesh.start_worker(&format!("w{i}"));
        }
        let n = workers;
        let store = mesh.store.clone();
        eventually(Duration::from_secs(30), "workers ready", || async {
            let ws = store.list_workers().await.ok()?;
            (ws.iter().filter(|w| w.status == WorkerStatus::Ready).count() == n).then_some(())
        })
        .await
        .unwrap();
        mesh
    }

    fn serve(&mut self, name: &str, service: &str, extra: &[&str]) {
        let url = self.redis.url();
        let mut args = vec![
            "serve",
            service,
            "--redis-url",
            &url,
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--health-addr",
            "127.0.0.1:0",
            "--replica-id",
            name,
        ];
        args.extend_from_slice(extra);
        let (proc, line) =
            Proc::sllm(&args, &[("SLLM_JOIN_SECRET", JOIN_SECRET)], "serving gRPC on").unwrap();
        let addr = line.rsplit(' ').next().unwrap().trim().to_string();
        self.endpoints.insert(name.to_string(), format!("http://{addr}"));
        self.procs.insert(name.to_string(), proc);
    }

    fn start_worker(&mut self, node: &str) {
        let registries = format!("{},{}", self.endpoints["wr-a"], self.endpoints["wr-b"]);
        let address = format!("sim-{node}");
        let args = [
            "worker",
            "--backend",
            "sim",
            "--registry",
            &registries,
            "--node-id",
            node,
            "--address",
            &address,
            "--gpus",
            "2",
            "--time-scale",
            "0.01",
            "--decode-ms",
            "800",
            "--prefill-ms",
            "1000",
            "--checkpoint",
            "m0=2GB@host_memory",
            "--checkpoint",
            "m1=2GB@disk",
        ];
        let (proc, _) =
            Proc::sllm(&args, &[("SLLM_JOIN_SECRET", JOIN_SECRET)], "worker(s) started").unwrap();
        self.procs.insert(node.to_string(), proc);
        self.workers.push(node.to_string());
    }

    /// SIGTERMs the process `name` (a graceful stop, as Kubernetes does on a rollout) and
    /// returns at once; [`Mesh::exited`] waits for it.
    pub fn terminate(&mut self, name: &str) {
        self.procs.get(name).unwrap_or_else(|| panic!("no process {name}")).send_signal("TERM");
        self.workers.retain(|w| w != name);
    }

    /// Waits up to `within` for the process `name` to exit; its exit status if it did.
    pub async fn exited(
        &mut self,
        name: &str,
        within: Duration,
    ) -> Option<std::process::ExitStatus> {
        let p = self.procs.get_mut(name).unwrap_or_else(|| panic!("no process {name}"));
        p.exited(within).await
    }

    /// The plain-text gRPC health endpoint (`--health-addr`) of the service process `name`.
    pub async fn health_endpoint(&self, name: &str) -> String {
        let p = &self.procs[name];
        let addr = eventually(Duration::from_secs(5), "the health listener's address", || async {
            p.output()
                .lines()
                .find_map(|l| l.strip_prefix("sllm: gRPC health on "))
                .map(|a| a.trim().to_string())
        })
        .await
        .unwrap();
        format!("http://{addr}")
    }

    /// SIGKILLs the process `name`.
    pub fn kill(&mut self, name: &str) {
        let mut p = self.procs.remove(name).unwrap_or_else(|| panic!("no process {name}"));
        p.kill();
        self.workers.retain(|w| w != name);
    }

    /// Workers still running.
    pub fn live_workers(&self) -> &[String] {
        &self.workers
    }

    /// Deploys `model` (sim backend, one GPU) through the ModelRegistry process.
    pub async fn deploy(&self, model: &str, min: i32, max: i32) {
        let mut c = pb::model_registry_client::ModelRegistryClient::connect(
            self.endpoints["models"].clone(),
        )
        .await
        .unwrap();
        c.deploy(pb::DeployRequest {
            spec: Some(pb::DeploymentSpec {
                model: model.into(),
                backend: "sim".into(),
                num_gpus: 1,
                auto_scaling_config: Some(pb::AutoScalingConfig {
                    metric: "concurrency".into(),
                    target: 8.0,
                    min_instances: min,
                    max_instances: max,
                    keep_alive: 2,
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    }

    /// Waits until each of `models` has at least `n` ready instances, all on live workers.
    pub async fn ready(&self, models: &[&str], n: usize, within: Duration) {
        let live = self.workers.clone();
        let store = self.store.clone();
        eventually(within, "instances ready on live workers", || {
            let (store, live) = (store.clone(), live.clone());
            async move {
                for m in models {
                    let all = store.model_instances(m).await.ok()?;
                    let ready = all
                        .iter()
                        .filter(|i| {
                            i.status == InstanceStatus::Ready && live.contains(&i.worker_id)
                        })
                        .count();
                    if ready < n {
                        return None;
                    }
                }
                Some(())
            }
        })
        .await
        .unwrap();
    }

    /// The current Scaler leader, asked of the replica `via`.
    pub async fn leader(&self, via: &str) -> Option<(String, u64)> {
        let mut c =
            pb::scaler_client::ScalerClient::connect(self.endpoints[via].clone()).await.ok()?;
        let l = c.get_leader(pb::GetLeaderRequest {}).await.ok()?.into_inner();
        (!l.holder.is_empty()).then_some((l.holder, l.fencing_token))
    }

    /// `sllm_dispatch_retries_total` summed over the Dispatch replicas still running.
    pub async fn dispatch_retries(&self) -> u64 {
        let mut total = 0.0;
        for (name, p) in &self.procs {
            if !name.starts_with("dispatch") {
                continue;
            }
            let out = p.output();
            let Some(addr) = out.lines().find_map(|l| l.strip_prefix("sllm: metrics on ")) else {
                continue;
            };
            let Ok(o) =
                tokio::process::Command::new("curl").args(["-s", addr.trim()]).output().await
            else {
                continue;
            };
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                if line.starts_with(telemetry::metrics::DISPATCH_RETRIES_TOTAL)
                    && let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok())
                {
                    total += v;
                }
            }
        }
        total as u64
    }
}
