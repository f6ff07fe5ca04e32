use std::time::Duration;

use sllm_api::v1 as pb;
use tonic::Code;

use crate::*;

#[tokio::test]
async fn deploy_get_list_and_duplicates() {
    let c = Cluster::start().await;
    let mut client = c.client().await;
    let mut s = spec("facebook/opt-1.3b", 0, 2, 1.0, 10);
    s.backend_config = Some(service::convert::json_to_struct(&serde_json::json!({
        "pretrained_model_name_or_path": "facebook/opt-1.3b", "torch_dtype": "float16", "max_len": 2048
    })));
    let resp =
        client.deploy(pb::DeployRequest { spec: Some(s.clone()) }).await.unwrap().into_inner();
    let d = resp.deployment.unwrap();
    assert_eq!((d.version, d.state), (1, pb::DeploymentState::Active as i32));
    assert!(resp.warnings.iter().any(|w| w.contains("no worker")), "{:?}", resp.warnings);

    let got = client
        .get(pb::GetRequest { model: "facebook/opt-1.3b".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.spec.as_ref(), Some(&s), "backend_config round-trips as written");
    // ServerlessLLM's name:backend form is accepted.
    let got = client
        .get(pb::GetRequest { model: "facebook/opt-1.3b:sim".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.spec.unwrap().model, "facebook/opt-1.3b");

    let err = client.deploy(pb::DeployRequest { spec: Some(s) }).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(err.message().contains("already deployed"), "{}", err.message());

    // A model scaled to zero stays listed, with its state.
    let list = client.list(pb::ListRequest {}).await.unwrap().into_inner().deployments;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].desired_instances, 0);
    assert_eq!(list[0].instances, Some(pb::InstanceCounts::default()));

    let err = client.get(pb::GetRequest { model: "missing".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn every_invalid_deploy_is_refused_naming_the_field() {
    let c = Cluster::start().await;
    let mut client = c.client().await;
    let base = || spec("m", 0, 2, 1.0, 0);
    let with = |f: fn(&mut pb::DeploymentSpec)| {
        let mut s = base();
        f(&mut s);
        Some(s)
    };
    let cases: Vec<(Option<pb::DeploymentSpec>, &str)> = vec![
        (None, "spec"),
        (with(|s| s.model = String::new()), "spec.model"),
        (with(|s| s.model = "bad name".into()), "spec.model"),
        (with(|s| s.model = "opt:vllm".into()), "spec.model"),
        (with(|s| s.model = "x".repeat(10_000)), "spec.model"),
        (with(|s| s.backend = String::new()), "spec.backend"),
        (with(|s| s.num_gpus = 0), "spec.num_gpus"),
        (with(|s| s.num_gpus = -2), "spec.num_gpus"),
        (
            with(|s| s.auto_scaling_config.as_mut().unwrap().min_instances = 5),
            "spec.auto_scaling_config.min_instances",
        ),
        (
            with(|s| s.auto_scaling_config.as_mut().unwrap().min_instances = -1),
            "spec.auto_scaling_config.min_instances",
        ),
        (
            with(|s| s.auto_scaling_config.as_mut().unwrap().target = 0.0),
            "spec.auto_scaling_config.target",
        ),
        (
            with(|s| s.auto_scaling_config.as_mut().unwrap().target = -3.0),
            "spec.auto_scaling_config.target",
        ),
        (
            with(|s| s.auto_scaling_config.as_mut().unwrap().metric = "qps".into()),
            "spec.auto_scaling_config.metric",
        ),
        (
            with(|s| s.auto_scaling_config.as_mut().unwrap().max_instances = 0),
            "spec.auto_scaling_config.max_instances",
        ),
        (
            with(|s| s.auto_scaling_config.as_mut().unwrap().keep_alive = -5),
            "spec.auto_scaling_config.keep_alive",
        ),
    ];
    for (spec, field) in cases {
        let err = client.deploy(pb::DeployRequest { spec: spec.clone() }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{spec:?}: {}", err.message());
        assert!(
            err.message().contains(&format!("{field}:")),
            "{field} not named in {:?}",
            err.message()
        );
    }
    assert!(c.store.list_deployments().await.unwrap().is_empty(), "nothing was stored");
}

#[tokio::test]
async fn more_gpus_than_any_worker_has_is_a_warning_not_a_refusal() {
    let c = Cluster::start().await;
    let _w = c.worker("w1", fast_sim()).await;
    let mut s = spec("big", 0, 1, 1.0, 0);
    s.num_gpus = 8;
    let resp =
        c.client().await.deploy(pb::DeployRequest { spec: Some(s) }).await.unwrap().into_inner();
    assert!(
        resp.warnings.iter().any(|w| w.contains("num_gpus is 8") && w.contains("4 GPUs")),
        "{:?}",
        resp.warnings
    );
    assert!(c.store.get_deployment("big").await.unwrap().is_some());
}

#[tokio::test]
async fn update_changes_scaling_without_disturbing_running_instances() {
    let c = Cluster::start().await;
    let _w = c.worker("w1", fast_sim()).await;
    let _s = c.scaler("s1").await;
    c.deploy("m", 1, 2, 1.0, 0).await;
    let before = c.settled("m", 1, Duration::from_secs(10)).await;
    let mut client = c.client().await;
    let resp = client
        .update(pb::UpdateRequest {
            model: "m".into(),
            auto_scaling_config: Some(pb::AutoScalingConfig {
                target: 4.0,
                min_instances: 1,
                max_instances: 6,
                ..Default::default()
            }),
            expected_version: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let d = resp.deployment.unwrap();
    assert_eq!(d.version, 2);
    assert_eq!(d.spec.unwrap().auto_scaling_config.unwrap().max_instances, 6);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = c.settled("m", 1, Duration::from_secs(5)).await;
    assert_eq!(before[0].instance_id, after[0].instance_id, "the running instance was not touched");
    assert_eq!(before[0].version, after[0].version);

    let err = client
        .update(pb::UpdateRequest {
            model: "m".into(),
            auto_scaling_config: Some(pb::AutoScalingConfig {
                target: 1.0,
                max_instances: 1,
                ..Default::default()
            }),
            expected_version: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    let err = client
        .update(pb::UpdateRequest {
            model: "m".into(),
            auto_scaling_config: None,
            expected_version: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("auto_scaling_config"), "{}", err.message());
    let err = client
        .update(pb::UpdateRequest {
            model: "nope".into(),
            auto_scaling_config: Some(pb::AutoScalingConfig {
                target: 1.0,
                max_instances: 1,
                ..Default::default()
            }),
            expected_version: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn deleting_a_model_drains_and_removes_its_instances_then_the_record() {
    let c = Cluster::start().await;
    let w = c.worker("w1", fast_sim()).await;
    let _s = c.scaler("s1").await;
    c.deploy("m", 2, 2, 1.0, 0).await;
    c.settled("m", 2, Duration::from_secs(10)).await;
    let mut client = c.client().await;
    let resp = client
        .delete(pb::DeleteRequest { model: "m".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.deployment.unwrap().state, pb::DeploymentState::Deleting as i32);
    let err = client.delete(pb::DeleteRequest { model: "m".into(), ..Default::default() }).await;
    if let Err(err) = err {
        // Either still deleting (FAILED_PRECONDITION) or already gone (NOT_FOUND).
        assert!(matches!(err.code(), Code::FailedPrecondition | Code::NotFound), "{err:?}");
    }
    eventually(Duration::from_secs(10), "deployment removed", || async {
        c.store.get_deployment("m").await.unwrap().is_none().then_some(())
    })
    .await
    .unwrap();
    assert!(c.instances("m").await.is_empty());
    assert!(w.backend.inventory_running().is_empty(), "the worker stopped them");
    assert_eq!(c.store.get_worker("w1").await.unwrap().unwrap().free_gpus, [0, 1, 2, 3]);
    let err = client.get(pb::GetRequest { model: "m".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .delete(pb::DeleteRequest { model: "never".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

/// Deploys that arrive together share one read of the fleet, and each still gets the warnings
/// that hold for its own spec: with one 2-GPU worker registered, 32 concurrent deploys asking
/// for 4 GPUs are told no worker has that many, and 32 asking for 2 are told nothing.
#[tokio::test]
async fn concurrent_deploys_each_get_their_own_warnings() {
    let c = Cluster::start().await;
    let _w = c.worker("w1", worker::SimConfig { gpus: 2, ..fast_sim() }).await;
    let client = c.client().await;
    let deploys = (0..64).map(|i| {
        let mut client = client.clone();
        async move {
            let mut s = spec(&format!("m{i}"), 0, 1, 1.0, 0);
            s.num_gpus = if i % 2 == 0 { 4 } else { 2 };
            let warnings = client
                .deploy(pb::DeployRequest { spec: Some(s) })
                .await
                .unwrap()
                .into_inner()
                .warnings;
            (i, warnings)
        }
    });
    for (i, warnings) in futures::future::join_all(deploys).await {
        if i % 2 == 0 {
            assert!(
                warnings.len() == 1 && warnings[0].contains("no registered worker has more than 2"),
                "m{i}: {warnings:?}"
            );
        } else {
            assert!(warnings.is_empty(), "m{i}: {warnings:?}");
        }
    }
}
