//! Instance reports across a re-registration: a state change the agent sees while it moves to
//! another registry replica still reaches Redis.

use std::time::{Duration, Instant};

use kvstore::{InstanceStatus, WorkerStatus};
use sllm_api::v1 as pb;
use sllm_integration_tests::{JOIN_SECRET, Proc, RedisServer, SimWorker, eventually};

use crate::*;

/// How long the simulated instance loads (1.5 GiB from remote storage at 1 GiB/s).
const LOAD: Duration = Duration::from_millis(1500);

fn serve(url: &str, service: &str, extra: &[&str]) -> (Proc, String) {
    let mut args = vec![
        "serve",
        service,
        "--redis-url",
        url,
        "--metrics-addr",
        "off",
        "--grpc-addr",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let (proc, line) =
        Proc::sllm(&args, &[("SLLM_JOIN_SECRET", JOIN_SECRET)], "serving gRPC on").unwrap();
    let endpoint = format!("http://{}", line.rsplit(' ').next().unwrap().trim());
    (proc, endpoint)
}

/// The instance finishes loading while its worker re-registers: the registry replica holding
/// the session is SIGKILLed, and Redis stalls so that the worker's inventory is taken while the
/// instance loads and the new session is confirmed only after it is ready. The Ready report
/// must not be lost: the instance ends `ready` and serves a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_becomes_ready_while_its_registry_replica_dies_ends_ready() {
    let redis = RedisServer::start().unwrap();
    let store = redis.store_with(|c| c.namespace = "sllm".into()).await.unwrap();
    let url = redis.url();
    let timing = ["--lease-ms", "1500", "--heartbeat-ms", "300"];
    let (mut wr_a, a) = serve(&url, "worker-registry", &timing);
    let (_wr_b, b) = serve(&url, "worker-registry", &timing);
    let (_dispatch, dispatch) = serve(&url, "dispatch", &["--openai-addr", "127.0.0.1:0"]);
    let registries = format!("{a},{b}");
    let (_worker, _) = Proc::sllm(
        &[
            "worker",
            "--backend",
            "sim",
            "--registry",
            &registries,
            "--node-id",
            "w1",
            "--address",
            "10.0.0.1",
            "--gpus",
            "2",
            "--checkpoint",
            "m=1.5GiB@remote",
        ],
        &[("SLLM_JOIN_SECRET", JOIN_SECRET)],
        "started",
    )
    .unwrap();
    let first_epoch = eventually(Duration::from_secs(10), "worker ready", || async {
        let w = store.get_worker("w1").await.unwrap()?;
        (w.status == WorkerStatus::Ready).then_some(w.epoch)
    })
    .await
    .unwrap();
    deploy(&store, "m").await;
    let lease = lead(&store).await;
    place(&store, &lease, "i1", "m", "w1", &[0]).await;
    eventually(Duration::from_secs(5), "instance loading", || async {
        (instance_status(&store, "i1").await? == InstanceStatus::Loading).then_some(())
    })
    .await
    .unwrap();
    let loading_at = Instant::now();

    // Redis stalls (for less than the services' 2 s command timeout, so nothing gives up), then
    // the replica holding the session dies: the worker re-registers through the other one with
    // the instance still loading, and its registration completes only after the load ended.
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.pause();
    let paused_at = Instant::now();
    wr_a.kill();
    tokio::time::sleep(
        (loading_at + LOAD + Duration::from_millis(300)).duration_since(Instant::now()),
    )
    .await;
    redis.resume();
    let paused = paused_at.elapsed();
    assert!(paused < Duration::from_millis(1900), "Redis was paused for {paused:?}");

    eventually(Duration::from_secs(5), "instance ready after the re-registration", || async {
        (instance_status(&store, "i1").await? == InstanceStatus::Ready).then_some(())
    })
    .await
    .unwrap_or_else(|e| {
        panic!("{e}: instance is {:?}", futures::executor::block_on(instance_status(&store, "i1")))
    });
    let w = store.get_worker("w1").await.unwrap().unwrap();
    assert!(
        w.epoch > first_epoch,
        "the worker re-registered (epoch {} after {first_epoch})",
        w.epoch
    );
    assert_eq!(w.status, WorkerStatus::Ready);

    // And it serves a request.
    let text = eventually(Duration::from_secs(10), "a request served", || async {
        let mut c = pb::dispatch_client::DispatchClient::connect(dispatch.clone()).await.ok()?;
        let req = pb::GenerateRequest {
            model: "m".into(),
            input: Some(pb::generate_request::Input::Prompt("hello".into())),
            params: Some(pb::SamplingParams { max_tokens: 4, seed: Some(7), ..Default::default() }),
            progress: false,
            timeout_ms: 5_000,
        };
        let mut stream = c.generate(req).await.ok()?.into_inner();
        let mut text = String::new();
        while let Some(e) = stream.message().await.ok()? {
            match e.event {
                Some(pb::generate_event::Event::Chunk(c)) => text.push_str(&c.text),
                Some(pb::generate_event::Event::Finished(_)) => return Some(text),
                _ => {}
            }
        }
        None
    })
    .await
    .unwrap();
    let want = worker::sim::text(7, "hello", 4);
    assert_eq!(text, want);
    let bad = store.check_invariants().await.unwrap();
    assert!(bad.is_empty(), "{bad:?}");
}

/// A failure reported into a session whose registry replica hangs and then dies is sent again
/// in the next session: the instance ends `failed` with the engine's reason, not merely
/// "not running" (which would hide why it went, and would not count as a failed start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_reported_to_a_registry_that_dies_unread_is_sent_again() {
    let redis = RedisServer::start().unwrap();
    let store = redis.store_with(|c| c.namespace = "sllm".into()).await.unwrap();
    let url = redis.url();
    let timing = ["--lease-ms", "1500", "--heartbeat-ms", "300"];
    let (mut wr_a, a) = serve(&url, "worker-registry", &timing);
    let (_wr_b, b) = serve(&url, "worker-registry", &timing);
    let sim = worker::SimConfig {
        gpus: 2,
        checkpoints: [("bad".to_string(), (3 << 29, worker::sim::Tier::Remote))].into(),
        fail_load: ["bad".to_string()].into(),
        ..worker::SimConfig::default()
    };
    let mut w = SimWorker::start(vec![a, b], "w1", sim).unwrap();
    let first_epoch = w.ready(0).await.unwrap();
    deploy(&store, "bad").await;
    let lease = lead(&store).await;
    place(&store, &lease, "i1", "bad", "w1", &[0]).await;
    eventually(Duration::from_secs(5), "instance loading", || async {
        (instance_status(&store, "i1").await? == InstanceStatus::Loading).then_some(())
    })
    .await
    .unwrap();
    let loading_at = Instant::now();

    // The replica holding the session hangs (its kernel still accepts what the worker sends),
    // the load fails and the worker reports it into that socket, then the replica dies with
    // the report unread.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = wr_a.pid().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    tokio::time::sleep(
        (loading_at + LOAD + Duration::from_millis(300)).duration_since(Instant::now()),
    )
    .await;
    assert!(w.backend.inventory_running().is_empty(), "the load failed while the replica hung");
    wr_a.kill();

    let epoch = w.ready(first_epoch).await.unwrap();
    assert!(epoch > first_epoch);
    let rec = eventually(Duration::from_secs(5), "instance ended", || async {
        let rec = store.get_instance("i1").await.unwrap()?;
        rec.status.is_terminal().then_some(rec)
    })
    .await
    .unwrap();
    assert_eq!(
        (rec.status, rec.reason.contains("simulated")),
        (InstanceStatus::Failed, true),
        "instance ended {} ({})",
        rec.status,
        rec.reason
    );
    let bad = store.check_invariants().await.unwrap();
    assert!(bad.is_empty(), "{bad:?}");
}
