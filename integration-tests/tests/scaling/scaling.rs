use std::collections::HashSet;
use std::time::Duration;

use kvstore::{EventBatch, InstanceStatus, WorkerStatus};
use sllm_api::v1 as pb;
use sllm_integration_tests::{DispatchReplica, Served, eventually};

use crate::*;

#[tokio::test]
async fn a_demand_event_scales_a_model_from_zero() {
    let c = Cluster::start().await;
    let _w = c.worker("w1", fast_sim()).await;
    let s = c.scaler("s1").await;
    c.deploy("m", 0, 2, 1.0, 60).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(c.instances("m").await.is_empty(), "scaled to zero while idle");

    // A cold request: Dispatch raises a demand event; no report has been sent yet.
    c.store.publish_demand("dispatch-test", "m", 1).await.unwrap();
    let ready = c.settled("m", 1, Duration::from_secs(10)).await;
    assert_eq!(ready[0].worker_id, "w1");
    let d = c.store.get_deployment("m").await.unwrap().unwrap();
    assert_eq!(d.desired, 1);

    let mut status = pb::scaler_client::ScalerClient::new(s.channel().await.unwrap());
    let st = status
        .get_scale_status(pb::GetScaleStatusRequest { model: "m".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.desired, 1);
    assert_eq!(st.actual.unwrap().ready, 1);
    let decision = st.last_decision.unwrap();
    assert_eq!((decision.from, decision.to), (0, 1));
    assert!(decision.reason.contains("demand event"), "{}", decision.reason);
    assert!(
        decision.reason.contains("placed") && decision.reason.contains("on w1"),
        "{}",
        decision.reason
    );
    let leader = status.get_leader(pb::GetLeaderRequest {}).await.unwrap().into_inner();
    assert_eq!(leader.holder, "s1");
    let err = status
        .get_scale_status(pb::GetScaleStatusRequest { model: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn scale_to_zero_waits_for_keep_alive() {
    let c = Cluster::start().await;
    let _w = c.worker("w1", fast_sim()).await;
    let _s = c.scaler("s1").await;
    c.deploy("m", 0, 2, 1.0, 2).await;
    c.demand("m", 0, 1).await;
    c.settled("m", 1, Duration::from_secs(10)).await;

    c.demand("m", 0, 0).await;
    // Well inside keep_alive (2 s) the instance stays.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let live = c.instances("m").await;
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].status, InstanceStatus::Ready, "not drained before keep_alive");
    // After it, the instance is drained and stopped and the model is back to zero.
    eventually(Duration::from_secs(5), "scaled to zero", || async {
        c.instances("m").await.is_empty().then_some(())
    })
    .await
    .unwrap();
    let d = c.store.get_deployment("m").await.unwrap().unwrap();
    assert_eq!(d.desired, 0);
    assert!(d.last_decision.contains("keep_alive"), "{}", d.last_decision);
    assert!(
        c.store.list_deployments().await.unwrap().iter().any(|d| d.spec.model == "m"),
        "still listed"
    );
}

#[tokio::test]
async fn a_burst_scales_out_at_once_and_never_past_max() {
    let c = Cluster::start().await;
    let _w1 = c.worker("w1", fast_sim()).await;
    let _w2 = c.worker("w2", fast_sim()).await;
    let _s = c.scaler("s1").await;
    c.deploy("m", 0, 3, 2.0, 60).await;
    c.demand("m", 4, 1).await; // ceil(5 / 2) = 3
    let ready = c.settled("m", 3, Duration::from_secs(10)).await;
    let workers: HashSet<&str> = ready.iter().map(|i| i.worker_id.as_str()).collect();
    assert_eq!(workers.len(), 2, "replicas spread over both workers: {ready:?}");
    c.demand("m", 40, 10).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(c.instances("m").await.len(), 3, "max_instances is 3");
    assert_eq!(c.store.get_deployment("m").await.unwrap().unwrap().desired, 3);
}

#[tokio::test]
async fn placement_picks_the_worker_with_the_fastest_checkpoint() {
    let c = Cluster::start().await;
    let sim = |tier: Option<pb::CheckpointTier>| {
        let mut s = fast_sim();
        if let Some(t) = tier {
            s.checkpoints.insert("m".into(), (20 << 30, t));
        }
        s
    };
    let _remote = c.worker("w-remote", sim(None)).await;
    let _disk = c.worker("w-disk", sim(Some(pb::CheckpointTier::Disk))).await;
    // The fastest worker has room for one instance only.
    let _host = c
        .worker(
            "w-host",
            worker::SimConfig { gpus: 1, ..sim(Some(pb::CheckpointTier::HostMemory)) },
        )
        .await;
    let _s = c.scaler("s1").await;
    c.deploy("m", 0, 3, 1.0, 60).await;
    c.demand("m", 1, 0).await;
    let ready = c.settled("m", 1, Duration::from_secs(10)).await;
    assert_eq!(ready[0].worker_id, "w-host");
    let d = c.store.get_deployment("m").await.unwrap().unwrap();
    assert!(d.last_decision.contains("checkpoint in host memory"), "{}", d.last_decision);
    // The next replica cannot fit there: it goes to the next fastest, the local disk.
    c.demand("m", 2, 0).await;
    let ready = c.settled("m", 2, Duration::from_secs(10)).await;
    assert!(ready.iter().any(|i| i.worker_id == "w-disk"), "{ready:?}");
}

#[tokio::test]
async fn two_scalers_never_both_act_and_the_survivor_takes_over() {
    let c = Cluster::start().await;
    let _w = c.worker("w1", fast_sim()).await;
    let a = c.scaler("s-a").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = c.scaler("s-b").await;
    let start = c.store.event_position().await.unwrap();
    c.deploy("m", 1, 1, 1.0, 60).await;
    let first = c.settled("m", 1, Duration::from_secs(10)).await;
    assert_eq!(c.store.current_leader("scaler").await.unwrap().unwrap().holder, "s-a");

    // The leader dies without a word; the follower takes over once the lease (900 ms) is out.
    let killed_at = std::time::Instant::now();
    a.kill();
    let lease = eventually(Duration::from_secs(3), "new leader", || async {
        c.store.current_leader("scaler").await.unwrap().filter(|l| l.holder == "s-b")
    })
    .await
    .unwrap();
    assert!(killed_at.elapsed() < Duration::from_millis(900 + 600), "took over within the lease");
    // The new leader acts: more demand gives a second... no: max is 1, so the running
    // instance is kept and nothing is started twice.
    c.deploy("n", 1, 1, 1.0, 60).await;
    c.settled("n", 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let now = c.settled("m", 1, Duration::from_secs(5)).await;
    assert_eq!(now[0].instance_id, first[0].instance_id);
    assert!(lease.token > 1);

    let mut reader = c.store.event_reader(start);
    let mut started = Vec::new();
    loop {
        match reader.next_batch(Duration::ZERO, 10_000).await.unwrap() {
            EventBatch::Events(e) if e.is_empty() => break,
            EventBatch::Events(e) => started.extend(
                e.into_iter()
                    .filter(|e| e.kind == "instance.pending")
                    .map(|e| e.field("model").unwrap_or_default().to_string()),
            ),
            EventBatch::FellBehind { .. } => panic!("trimmed"),
        }
    }
    started.sort();
    assert_eq!(started, ["m", "n"], "each model was started exactly once");
    drop(b);
}

#[tokio::test]
async fn failed_loads_are_retried_elsewhere_then_reported() {
    let c = Cluster::start().await;
    let mut sim = fast_sim();
    sim.fail_load.insert("broken".into());
    let _w: Vec<_> =
        futures::future::join_all(["w1", "w2", "w3", "w4"].map(|w| c.worker(w, sim.clone()))).await;
    let _s = c.scaler("s1").await;
    let start = c.store.event_position().await.unwrap();
    c.deploy("broken", 1, 1, 1.0, 60).await;
    let d = eventually(Duration::from_secs(15), "the Scaler gives up", || async {
        let d = c.store.get_deployment("broken").await.unwrap()?;
        (!d.last_error.is_empty()).then_some(d)
    })
    .await
    .unwrap();
    assert!(d.last_error.contains("gave up after 3 failed starts"), "{}", d.last_error);
    assert!(d.last_error.contains("loading broken failed"), "{}", d.last_error);
    tokio::time::sleep(Duration::from_millis(800)).await;

    let mut reader = c.store.event_reader(start);
    let mut placed_on = Vec::new();
    loop {
        match reader.next_batch(Duration::ZERO, 10_000).await.unwrap() {
            EventBatch::Events(e) if e.is_empty() => break,
            EventBatch::Events(e) => placed_on.extend(
                e.into_iter()
                    .filter(|e| e.kind == "instance.pending")
                    .map(|e| e.field("worker").unwrap_or_default().to_string()),
            ),
            EventBatch::FellBehind { .. } => panic!("trimmed"),
        }
    }
    assert_eq!(placed_on.len(), 3, "three attempts, then no loop: {placed_on:?}");
    assert_eq!(
        placed_on.iter().collect::<HashSet<_>>().len(),
        3,
        "each on another worker: {placed_on:?}"
    );

    // The API shows it too.
    let got =
        c.client().await.get(pb::GetRequest { model: "broken".into() }).await.unwrap().into_inner();
    assert!(got.last_error.contains("gave up"), "{}", got.last_error);
}

#[tokio::test]
async fn instances_on_a_lost_worker_are_replaced() {
    let c = Cluster::start().await;
    let w1 = c.worker("w1", fast_sim()).await;
    let _s = c.scaler("s1").await;
    c.deploy("m", 1, 1, 1.0, 60).await;
    let first = c.settled("m", 1, Duration::from_secs(10)).await;
    assert_eq!(first[0].worker_id, "w1");
    let _w2 = c.worker("w2", fast_sim()).await;
    drop(w1); // its agent stops: the session ends and the worker is lost at once
    let replaced = eventually(Duration::from_secs(10), "replacement ready on w2", || async {
        let all = c.instances("m").await;
        all.iter().find(|i| i.worker_id == "w2" && i.status == InstanceStatus::Ready).cloned()
    })
    .await
    .unwrap();
    assert_ne!(replaced.instance_id, first[0].instance_id);
    let old = c.store.get_instance(&first[0].instance_id).await.unwrap().unwrap();
    assert_eq!(old.status, InstanceStatus::Lost, "kept (not routable) in case the worker returns");
}

#[tokio::test]
async fn a_model_scales_to_zero_within_a_second_of_its_keep_alive() {
    let c = Cluster::start().await;
    let _w = c.worker("w1", fast_sim()).await;
    // The production pace: a 1 s tick, and Dispatch reporting demand every 250 ms.
    let mut config = ::scaler::ScalerConfig::new("s1");
    config.drain_grace = Duration::from_secs(2);
    let _s = Served::scaler(c.store.clone(), config).await.unwrap();
    let d = DispatchReplica::start(c.store.clone(), "d1", |d| {
        d.report_interval = Duration::from_millis(250);
    })
    .await
    .unwrap();
    c.deploy("m", 0, 2, 1.0, 2).await;

    // A cold request: held, the model starts, the answer streams back.
    let mut client = d.client().await.unwrap();
    let request = pb::GenerateRequest {
        model: "m".into(),
        input: Some(pb::generate_request::Input::Prompt("hello".into())),
        params: Some(pb::SamplingParams { max_tokens: 4, ..Default::default() }),
        progress: false,
        timeout_ms: 10_000,
    };
    let mut stream = client.generate(request).await.unwrap().into_inner();
    let mut finished = false;
    while let Some(e) = stream.message().await.unwrap() {
        finished |= matches!(e.event, Some(pb::generate_event::Event::Finished(_)));
    }
    assert!(finished, "the request was served");
    let ended = std::time::Instant::now();

    eventually(Duration::from_secs(10), "scaled to zero", || async {
        c.instances("m").await.is_empty().then_some(())
    })
    .await
    .unwrap();
    let took = ended.elapsed();
    assert!(took >= Duration::from_secs(2), "stopped before keep_alive: {took:?}");
    assert!(took < Duration::from_secs(3), "stopped {took:?} after the last request ended");
}

#[tokio::test]
async fn an_announcement_read_after_the_model_is_ready_does_not_hold_it_up() {
    let c = Cluster::start().await;
    let _w = c.worker("w1", fast_sim()).await;
    let mut config = ::scaler::ScalerConfig::new("s1");
    config.drain_grace = Duration::from_secs(2);
    let _s = Served::scaler(c.store.clone(), config).await.unwrap();
    c.deploy("m", 0, 2, 1.0, 2).await;
    c.store.publish_demand("dispatch-test", "m", 1).await.unwrap();
    c.settled("m", 1, Duration::from_secs(10)).await;
    // A held request re-announces itself every second; its last announcement can reach the
    // Scaler after the instance it was waiting for is ready, and after it was served.
    c.store.publish_demand("dispatch-test", "m", 1).await.unwrap();
    let served = std::time::Instant::now();

    eventually(Duration::from_secs(10), "scaled to zero", || async {
        c.instances("m").await.is_empty().then_some(())
    })
    .await
    .unwrap();
    let took = served.elapsed();
    assert!(took >= Duration::from_secs(2), "stopped before keep_alive: {took:?}");
    assert!(took < Duration::from_secs(3), "stopped {took:?} after the last request ended");
}

#[tokio::test]
async fn an_instance_stuck_loading_is_failed_and_replaced() {
    let c = Cluster::start().await;
    // The fastest worker for the model hangs while loading it.
    let mut hung = fast_sim();
    hung.hang_load.insert("m".into());
    hung.checkpoints.insert("m".into(), (4 << 30, pb::CheckpointTier::HostMemory));
    let w_hung = c.worker("w-hung", hung).await;
    let _w_ok = c.worker("w-ok", fast_sim()).await;
    let mut config = scaler_config("s1");
    config.start_timeout = Duration::from_secs(1);
    let s = Served::scaler(c.store.clone(), config).await.unwrap();
    c.deploy("m", 1, 1, 1.0, 60).await;

    let stuck = eventually(Duration::from_secs(5), "loading on w-hung", || async {
        c.instances("m").await.into_iter().find(|i| i.status == InstanceStatus::Loading)
    })
    .await
    .unwrap();
    assert_eq!(stuck.worker_id, "w-hung");
    let seen = std::time::Instant::now();
    let ready = c.settled("m", 1, Duration::from_secs(10)).await;
    assert_eq!(ready[0].worker_id, "w-ok", "replaced elsewhere");
    assert!(seen.elapsed() >= Duration::from_millis(700), "not failed before the timeout");

    let old = c.store.get_instance(&stuck.instance_id).await.unwrap().unwrap();
    assert_eq!(old.status, InstanceStatus::Failed);
    assert_eq!(old.reason, "stuck in loading for more than 1 s");
    // The hung engine was stopped and its GPU given back.
    eventually(Duration::from_secs(5), "stopped on w-hung", || async {
        w_hung.backend.inventory_running().is_empty().then_some(())
    })
    .await
    .unwrap();
    // `sllm status` shows why the replacement was made.
    let mut status = pb::scaler_client::ScalerClient::new(s.channel().await.unwrap());
    let st = status
        .get_scale_status(pb::GetScaleStatusRequest { model: "m".into() })
        .await
        .unwrap()
        .into_inner();
    let reason = st.last_decision.unwrap().reason;
    assert!(reason.contains("stuck in loading for more than 1 s"), "{reason}");
    assert!(reason.contains("placed") && reason.contains("on w-ok"), "{reason}");
}

/// A worker that takes the start command but never acts on it (the command or its report is
/// lost): its instance stays pending until the start timeout, then it is failed, and the model
/// starts elsewhere, with the reason in `sllm status`.
#[tokio::test]
async fn an_instance_stuck_pending_is_failed_and_replaced() {
    use sllm_api::v1::worker_message::Body as Up;
    let c = Cluster::start().await;
    // The deaf worker holds the checkpoint in host memory, so it is the first choice.
    let node = "w-deaf";
    let token =
        service::JoinSecret::new(sllm_integration_tests::JOIN_SECRET).unwrap().token_for(node);
    let register = pb::Register {
        node_id: node.into(),
        join_token: token,
        address: "10.9.9.9".into(),
        inventory: Some(pb::Inventory {
            gpus: vec![pb::Gpu { index: 0, name: "sim".into(), memory_bytes: 80 << 30 }],
            host_memory_bytes: 64 << 30,
            checkpoints: vec![pb::CachedCheckpoint {
                model: "m".into(),
                size_bytes: 4 << 30,
                tier: pb::CheckpointTier::HostMemory as i32,
            }],
            ..Default::default()
        }),
        agent_version: "deaf".into(),
    };
    let first = pb::WorkerMessage { epoch: 0, body: Some(Up::Register(register)) };
    let mut session =
        sllm_integration_tests::RawSession::open(&c.registry.endpoint(), first).await.unwrap();
    session.send(Up::Ready(pb::WorkerReady {})).await;
    // It heartbeats and reads its commands, and does nothing else.
    let deaf = tokio::spawn(async move {
        let mut seq = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    seq += 1;
                    session.send(Up::Heartbeat(pb::Heartbeat { seq })).await;
                }
                m = session.inbound.message() => if !matches!(m, Ok(Some(_))) { return },
            }
        }
    });
    eventually(Duration::from_secs(5), "the deaf worker is placeable", || async {
        let w = c.store.list_workers().await.unwrap();
        w.iter().any(|w| w.worker_id == node && w.status == WorkerStatus::Ready).then_some(())
    })
    .await
    .unwrap();
    let _w_ok = c.worker("w-ok", fast_sim()).await;
    let mut config = scaler_config("s1");
    config.start_timeout = Duration::from_secs(1);
    let s = Served::scaler(c.store.clone(), config).await.unwrap();
    c.deploy("m", 1, 1, 1.0, 60).await;

    let stuck = eventually(Duration::from_secs(5), "pending on the deaf worker", || async {
        c.instances("m").await.into_iter().find(|i| i.status == InstanceStatus::Pending)
    })
    .await
    .unwrap();
    assert_eq!(stuck.worker_id, node);
    let seen = std::time::Instant::now();
    let ready = c.settled("m", 1, Duration::from_secs(10)).await;
    assert_eq!(ready[0].worker_id, "w-ok", "replaced elsewhere");
    assert!(seen.elapsed() >= Duration::from_millis(700), "not failed before the timeout");
    let old = c.store.get_instance(&stuck.instance_id).await.unwrap().unwrap();
    assert_eq!(old.status, InstanceStatus::Failed);
    assert_eq!(old.reason, "stuck in pending for more than 1 s");

    let mut status = pb::scaler_client::ScalerClient::new(s.channel().await.unwrap());
    let st = status
        .get_scale_status(pb::GetScaleStatusRequest { model: "m".into() })
        .await
        .unwrap()
        .into_inner();
    let reason = st.last_decision.unwrap().reason;
    assert!(reason.contains("stuck in pending for more than 1 s"), "{reason}");
    assert!(reason.contains("on w-ok"), "{reason}");
    assert!(st.last_error.is_empty(), "a replaced start is no lasting error: {}", st.last_error);
    deaf.abort();
}
