//! SIGTERM, as Kubernetes sends it on a rollout or an eviction, to a Dispatch, a worker and the
//! Scaler leader, each under load: no client sees an error. A Dispatch stops accepting at once
//! (its listeners close, its readiness turns NOT_SERVING), lets the requests it holds finish and
//! exits 0; a worker leaves its session (nothing new is routed to it), lets its instances'
//! requests finish and exits 0; the Scaler leader hands its lease over at once instead of
//! letting it expire.
//!
//! The test plays the Service in front of Dispatch: like the endpoints controller during a
//! pod's `preStop` pause, it takes the replica out of the clients' rotation before the signal.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvstore::{InstanceStatus, WorkerStatus};
use sllm_integration_tests::{RedisServer, eventually};
use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::load::{Attempt, Entry, Ledger, generate};
use crate::mesh::{Mesh, SCALER_LEASE};

/// Tokens of a long request: about 6 s at the mesh workers' 8 ms a token, longer than the
/// 5 s a stopping `sllm serve` used to allow before dropping everything.
const LONG_TOKENS: u32 = 700;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_dispatch_worker_and_scaler_leader_under_load_no_client_error() {
    let mut mesh = Mesh::start(RedisServer::start().unwrap(), 4).await;
    mesh.deploy("m0", 2, 4).await;
    // One instance: the worker phase drains exactly the worker that runs it.
    mesh.deploy("m1", 1, 1).await;
    mesh.ready(&["m0", "m1"], 1, Duration::from_secs(30)).await;
    mesh.ready(&["m0"], 2, Duration::from_secs(30)).await;
    let load = Steady::start(&mesh, &["dispatch-a", "dispatch-b"], 3, &["m0", "m1"]);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // --- A Dispatch replica is rolled. ---
    load.phase("dispatch-b drains");
    let b = mesh.endpoints["dispatch-b"].clone();
    let health = mesh.health_endpoint("dispatch-b").await;
    assert_eq!(status(&health, "sllm.v1.Dispatch").await, Some(ServingStatus::Serving));
    let long = Long::start(&b, "m0", "via b", 6).await;
    load.remove("dispatch-b");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    mesh.terminate("dispatch-b");
    // It stops accepting at once: new connections are refused, readiness fails, liveness holds.
    let grpc_addr = b.trim_start_matches("http://").to_string();
    eventually(Duration::from_secs(2), "dispatch-b refuses new connections", || {
        let a = grpc_addr.clone();
        async move { tokio::net::TcpStream::connect(a).await.is_err().then_some(()) }
    })
    .await
    .unwrap();
    eventually(Duration::from_secs(2), "dispatch-b's readiness NOT_SERVING", || {
        let h = health.clone();
        async move {
            (status(&h, "sllm.v1.Dispatch").await == Some(ServingStatus::NotServing)).then_some(())
        }
    })
    .await
    .unwrap();
    assert_eq!(status(&health, "").await, Some(ServingStatus::Serving), "liveness while draining");
    assert!(mesh.exited("dispatch-b", Duration::ZERO).await.is_none(), "exited mid-request");
    let last = long.finish().await.saturating_duration_since(t0);
    let status_b = mesh.exited("dispatch-b", Duration::from_secs(30)).await;
    let exit_b = t0.elapsed();
    assert!(status_b.is_some_and(|s| s.success()), "dispatch-b exited with {status_b:?}");
    let waited = exit_b.saturating_sub(last);
    assert!(
        waited < Duration::from_secs(3),
        "dispatch-b lingered {waited:?} after its last request"
    );
    println!("dispatch-b: last request done {last:?} after SIGTERM, exited after {exit_b:?}");

    // --- The GPU worker that runs m1 is stopped (a DaemonSet rollout, a node taken out). ---
    load.phase("worker drains");
    let a = mesh.endpoints["dispatch-a"].clone();
    let instances = mesh.store.model_instances("m1").await.unwrap();
    let one = instances.iter().find(|i| i.status == InstanceStatus::Ready).expect("m1 runs");
    let (victim, instance) = (one.worker_id.clone(), one.instance_id.clone());
    let long = Long::start(&a, "m1", "via a", 4).await;
    let t0 = Instant::now();
    mesh.terminate(&victim);
    // It leaves at once: nothing new is routed to it.
    let store = mesh.store.clone();
    eventually(Duration::from_secs(2), "the drained worker is out of the placeable set", || {
        let (store, victim) = (store.clone(), victim.clone());
        async move {
            let w = store.get_worker(&victim).await.ok()??;
            (w.status == WorkerStatus::Lost).then_some(())
        }
    })
    .await
    .unwrap();
    let record = mesh.store.get_instance(&instance).await.unwrap().expect("the instance record");
    assert_ne!(record.status, InstanceStatus::Ready, "still routable after its worker left");
    assert!(mesh.exited(&victim, Duration::ZERO).await.is_none(), "exited mid-request");
    let last = long.finish().await.saturating_duration_since(t0);
    let status_w = mesh.exited(&victim, Duration::from_secs(30)).await;
    let exit_w = t0.elapsed();
    assert!(status_w.is_some_and(|s| s.success()), "{victim} exited with {status_w:?}");
    let waited = exit_w.saturating_sub(last);
    assert!(waited < Duration::from_secs(3), "{victim} lingered {waited:?} after its last request");
    println!("{victim}: last request done {last:?} after SIGTERM, exited after {exit_w:?}");
    mesh.ready(&["m1"], 1, Duration::from_secs(20)).await;

    // --- The Scaler leader is rolled: its lease passes on at once, not after it expires. ---
    load.phase("scaler leader hands over");
    let (holder, token) = mesh.leader("scaler-a").await.expect("a leader");
    let other = if holder == "scaler-a" { "scaler-b" } else { "scaler-a" };
    let t0 = Instant::now();
    mesh.terminate(&holder);
    let new_token = {
        let mesh = &mesh;
        eventually(SCALER_LEASE * 3, "a new scaler leader", || async move {
            mesh.leader(other).await.filter(|(h, _)| h == other).map(|(_, t)| t)
        })
        .await
        .unwrap()
    };
    let takeover = t0.elapsed();
    let status_s = mesh.exited(&holder, Duration::from_secs(5)).await;
    assert!(status_s.is_some_and(|s| s.success()), "{holder} exited with {status_s:?}");
    assert!(new_token > token, "fencing token {new_token} after {token}");
    // The follower polls every lease / 6; an expiry would take a whole lease.
    assert!(takeover < SCALER_LEASE / 2, "new leader after {takeover:?}, lease {SCALER_LEASE:?}");
    println!("scaler: {other} leads {takeover:?} after SIGTERM to {holder}");
    // Requests go on completing while the lease changes hands. The hand-over can take less
    // time than one request on a loaded machine: the phase lasts until one has ended in it.
    {
        let ledger = &load.ledger;
        eventually(Duration::from_secs(5), "a request completed during the hand-over", || async {
            let done = ledger.lock().unwrap().completed_in("scaler leader hands over");
            (done > 0).then_some(())
        })
        .await
        .unwrap();
    }

    load.phase("settled");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ledger = load.stop().await;
    println!("{}", ledger.render("SIGTERM dispatch, worker, scaler leader", 0));
    let failed: Vec<&Entry> =
        ledger.entries.iter().filter(|e| !matches!(e.attempt, Attempt::Completed)).collect();
    assert!(failed.is_empty(), "clients saw errors: {failed:#?}");
    for phase in ["dispatch-b drains", "worker drains", "scaler leader hands over", "settled"] {
        assert!(ledger.completed_in(phase) > 0, "nothing completed in {phase}");
    }
}

/// The serving status of `service` at a `grpc.health.v1` endpoint (None: no answer).
async fn status(endpoint: &str, service: &str) -> Option<ServingStatus> {
    let ch =
        tonic::transport::Endpoint::from_shared(endpoint.to_string()).ok()?.connect().await.ok()?;
    let mut c = tonic_health::pb::health_client::HealthClient::new(ch);
    let r = c
        .check(tonic_health::pb::HealthCheckRequest { service: service.into() })
        .await
        .ok()?
        .into_inner();
    ServingStatus::try_from(r.status).ok()
}

/// Long streamed generations through one Dispatch, each past its first chunk (in flight, with
/// output) once `start` returns.
struct Long {
    tasks: Vec<tokio::task::JoinHandle<(Attempt, Instant)>>,
}

impl Long {
    async fn start(endpoint: &str, model: &str, tag: &str, n: usize) -> Long {
        let ch = tonic::transport::Endpoint::from_shared(endpoint.to_string())
            .unwrap()
            .tcp_nodelay(true)
            .connect()
            .await
            .unwrap();
        let mut tasks = Vec::new();
        let mut firsts = Vec::new();
        for i in 0..n {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let (ch, model, prompt) = (ch.clone(), model.to_string(), format!("long {tag} {i}"));
            tasks.push(tokio::spawn(async move {
                let a = generate(ch, &model, &prompt, LONG_TOKENS, Some(tx)).await;
                (a, Instant::now())
            }));
            firsts.push(rx);
        }
        for rx in firsts {
            tokio::time::timeout(Duration::from_secs(10), rx)
                .await
                .expect("a long request's first chunk")
                .expect("the long request ended before its first chunk");
        }
        Long { tasks }
    }

    /// Waits for every one to end; each must have completed with the whole text. Returns when
    /// the last one ended.
    async fn finish(self) -> Instant {
        let mut last = None;
        for t in self.tasks {
            let (attempt, at) = t.await.unwrap();
            assert!(matches!(attempt, Attempt::Completed), "a long request: {attempt:?}");
            last = Some(last.map_or(at, |l: Instant| l.max(at)));
        }
        last.expect("at least one long request")
    }
}

/// Short streamed generations from a few clients, each sent to the next Dispatch in the
/// rotation (the Service's endpoints); every attempt is recorded, and none is retried.
struct Steady {
    ledger: Arc<Mutex<Ledger>>,
    phase: Arc<Mutex<String>>,
    rotation: Arc<Mutex<Vec<(String, tonic::transport::Channel)>>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Steady {
    fn start(mesh: &Mesh, targets: &[&str], clients: usize, models: &[&str]) -> Steady {
        let rotation: Vec<(String, tonic::transport::Channel)> = targets
            .iter()
            .map(|name| {
                let ch = tonic::transport::Endpoint::from_shared(mesh.endpoints[*name].clone())
                    .unwrap()
                    .tcp_nodelay(true)
                    .connect_timeout(Duration::from_secs(1))
                    .connect_lazy();
                (name.to_string(), ch)
            })
            .collect();
        let steady = Steady {
            ledger: Arc::default(),
            phase: Arc::new(Mutex::new("warm".into())),
            rotation: Arc::new(Mutex::new(rotation)),
            stop: CancellationToken::new(),
            tasks: Vec::new(),
        };
        let mut tasks = Vec::new();
        for c in 0..clients {
            let (ledger, phase, rotation, stop) = (
                steady.ledger.clone(),
                steady.phase.clone(),
                steady.rotation.clone(),
                steady.stop.clone(),
            );
            let models: Vec<String> = models.iter().map(|m| m.to_string()).collect();
            tasks.push(tokio::spawn(async move {
                let mut n = 0usize;
                while !stop.is_cancelled() {
                    n += 1;
                    let model = &models[(n + c) % models.len()];
                    let (name, ch) = {
                        let r = rotation.lock().unwrap();
                        r[(n + c) % r.len()].clone()
                    };
                    let request = {
                        let mut l = ledger.lock().unwrap();
                        l.requests += 1;
                        l.requests
                    };
                    let phase_now = phase.lock().unwrap().clone();
                    let prompt = format!("steady {c} {n}");
                    let attempt = generate(ch, model, &prompt, 12, None).await;
                    ledger.lock().unwrap().entries.push(Entry {
                        request,
                        phase: phase_now,
                        dispatch: name,
                        attempt,
                    });
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }
        Steady { tasks, ..steady }
    }

    /// Labels the requests started from now on.
    fn phase(&self, name: &str) {
        *self.phase.lock().unwrap() = name.to_string();
    }

    /// Takes `name` out of the rotation: no client sends it anything new.
    fn remove(&self, name: &str) {
        self.rotation.lock().unwrap().retain(|(n, _)| n != name);
    }

    async fn stop(self) -> Ledger {
        self.stop.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
        std::mem::take(&mut *self.ledger.lock().unwrap())
    }
}
