use std::time::Duration;

use kvstore::{AutoScaling, Error, ErrorKind, EventBatch, Position, Store, StoreConfig};

use crate::*;

fn hostile_names() -> Vec<String> {
    vec![
        "opt:vllm".into(),
        "a*".into(),
        "{t0}x".into(),
        "has space".into(),
        "".into(),
        "x".repeat(10 * 1024),
        "tab\tname".into(),
        "ünicode".into(),
    ]
}

fn assert_invalid(err: Error, field: &str) {
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    match &err {
        Error::Invalid { field: f, .. } => assert_eq!(*f, field, "{err}"),
        other => panic!("expected Invalid, got {other}"),
    }
}

#[tokio::test]
async fn hostile_names_never_reach_a_key() {
    let (redis, store) = setup().await;
    store.create_deployment(&spec("m")).await.unwrap();
    ready_worker(&store, "w1", 1).await;
    let lease = lead(&store, "s").await;
    let before = dbsize(&redis, &store).await;
    for name in hostile_names() {
        assert_invalid(store.create_deployment(&spec(&name)).await.unwrap_err(), "model");
        assert_invalid(store.get_deployment(&name).await.unwrap_err(), "model");
        assert_invalid(store.mark_deployment_deleting(&name).await.unwrap_err(), "model");
        assert_invalid(
            store
                .register_worker(&name, true, "10.0.0.9", LEASE, &inventory(1), "t")
                .await
                .unwrap_err(),
            "node_id",
        );
        assert_invalid(store.heartbeat(&name, 1, LEASE).await.unwrap_err(), "worker_id");
        assert_invalid(
            store.create_instance(&lease, &placement(&name, "m", "w1", &[0])).await.unwrap_err(),
            "instance_id",
        );
        assert_invalid(store.send_command("w1", &name, b"x").await.unwrap_err(), "command_id");
    }
    for address in ["10.0.0.1 ", "a/b", "*", &"1".repeat(300)] {
        assert_invalid(
            store
                .register_worker("w9", true, address, LEASE, &inventory(1), "t")
                .await
                .unwrap_err(),
            "address",
        );
    }
    assert_invalid(store.ack_command("w1", "0-0 OR 1").await.unwrap_err(), "stream_id");
    assert_invalid(store.read_commands("w1", "+", 1).await.unwrap_err(), "after");
    assert_eq!(dbsize(&redis, &store).await, before, "nothing was written");
    let err =
        Store::connect(StoreConfig::new(redis.url()).with_namespace("a}b")).await.err().unwrap();
    assert_invalid(err, "namespace");
    let err = Store::connect(StoreConfig::new("http://localhost")).await.err().unwrap();
    assert_invalid(err, "redis_url");
}

#[tokio::test]
async fn deployment_specs_are_checked_field_by_field() {
    let (redis, store) = setup().await;
    let before = dbsize(&redis, &store).await;
    let policy = |f: fn(&mut AutoScaling)| {
        let mut s = spec("m");
        f(&mut s.autoscaling);
        s
    };
    let cases = [
        (policy(|a| a.min_instances = 5), "auto_scaling_config.min_instances"),
        (policy(|a| a.target = 0.0), "auto_scaling_config.target"),
        (policy(|a| a.target = -1.0), "auto_scaling_config.target"),
        (policy(|a| a.target = f64::NAN), "auto_scaling_config.target"),
        (policy(|a| a.metric = "qps".into()), "auto_scaling_config.metric"),
        (policy(|a| a.max_instances = 0), "auto_scaling_config.max_instances"),
        (kvstore::DeploymentSpec { num_gpus: 0, ..spec("m") }, "num_gpus"),
        (kvstore::DeploymentSpec { backend: "v llm".into(), ..spec("m") }, "backend"),
        (kvstore::DeploymentSpec { backend_config: "[1]".into(), ..spec("m") }, "backend_config"),
        (kvstore::DeploymentSpec { backend_config: "{oops".into(), ..spec("m") }, "backend_config"),
    ];
    for (s, field) in cases {
        assert_invalid(store.create_deployment(&s).await.unwrap_err(), field);
    }
    assert_invalid(
        store
            .update_autoscaling("m", &AutoScaling { target: 0.0, ..Default::default() }, 0)
            .await
            .unwrap_err(),
        "auto_scaling_config.target",
    );
    assert_eq!(dbsize(&redis, &store).await, before);
}

#[tokio::test]
async fn malformed_records_name_the_key_and_field() {
    let (redis, store) = setup().await;
    store.create_deployment(&spec("m")).await.unwrap();
    ready_worker(&store, "w1", 1).await;
    let lease = lead(&store, "s").await;
    store.create_instance(&lease, &placement("i1", "m", "w1", &[0])).await.unwrap();
    let keys = store.keys().clone();
    let mut raw = redis.raw().await.unwrap();
    let mut damage = async |args: &[&str]| {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        let _: redis::Value = cmd.query_async(&mut raw).await.unwrap();
    };
    let malformed = |err: Error, key: &str, field: &str| match err {
        Error::Malformed { key: k, field: f, .. } => {
            assert_eq!((k.as_str(), f.as_str()), (key, field))
        }
        other => panic!("expected Malformed {key} {field}, got {other}"),
    };

    damage(&["HSET", &keys.deployment("m"), "version", "seven"]).await;
    malformed(store.get_deployment("m").await.unwrap_err(), &keys.deployment("m"), "version");
    malformed(store.list_deployments().await.unwrap_err(), &keys.deployment("m"), "version");
    damage(&["HSET", &keys.deployment("m"), "version", "7"]).await;
    damage(&["HDEL", &keys.deployment("m"), "backend"]).await;
    malformed(store.get_deployment("m").await.unwrap_err(), &keys.deployment("m"), "backend");

    damage(&["HSET", &keys.worker("w1"), "gpus", "{not json"]).await;
    malformed(store.get_worker("w1").await.unwrap_err(), &keys.worker("w1"), "gpus");
    damage(&["HSET", &keys.worker("w1"), "gpus", "[]", "status", "READY"]).await;
    malformed(store.get_worker("w1").await.unwrap_err(), &keys.worker("w1"), "status");

    damage(&["HSET", &keys.instance("i1"), "gpus", "0,x"]).await;
    malformed(store.get_instance("i1").await.unwrap_err(), &keys.instance("i1"), "gpus");

    // The checker reports damage instead of failing.
    let bad = store.check_invariants().await.unwrap();
    assert!(bad.iter().any(|b| b.contains("backend")), "{bad:?}");
    assert!(bad.iter().any(|b| b.contains("status")), "{bad:?}");

    // A hand-written event without a sequence number.
    damage(&["XADD", &keys.events(), "*", "kind", "x", "id", "y"]).await;
    let mut reader = store.event_reader(Position::start());
    match reader.next_batch(Duration::ZERO, 1000).await {
        Err(Error::Malformed { field, .. }) => assert_eq!(field, "seq"),
        Ok(EventBatch::Events(e)) => panic!("read {} events without noticing", e.len()),
        other => panic!("expected Malformed, got {other:?}"),
    }
}

#[tokio::test]
async fn the_lua_prelude_builds_the_same_keys_as_rust() {
    let (redis, store) = setup().await;
    let k = store.keys();
    let script = format!(
        "{}\nreturn {{K.events_seq, K.deployments, K.lease_deadlines, K.workers, K.commands_notify, \
         K.deployment('a/b'), K.deployments_status('active'), K.model_instances('a/b'), K.worker('w'), \
         K.workers_status('ready'), K.worker_instances('w'), K.free_gpus('w'), K.address('1.2.3.4'), \
         K.instance('i'), K.instances_status('ready'), K.commands('w'), K.commands_acked('w'), \
         K.leader('r'), K.leader_token('r'), K.demand_reporters, K.demand('d'), K.dispatchers, K.dispatcher_endpoints, \
         K.ratelimit('b'), K.unplaceable, K.lost_workers, K.rate_replicas, K.rate_share('c'), K.lineage, K.recovering}}",
        kvstore::PRELUDE
    );
    let mut raw = redis.raw().await.unwrap();
    let lua: Vec<String> = redis::cmd("EVAL")
        .arg(script)
        .arg(1)
        .arg(k.events())
        .arg(k.root())
        .arg(10)
        .arg(10)
        .query_async(&mut raw)
        .await
        .unwrap();
    let rust = vec![
        k.events_seq(),
        k.deployments(),
        k.lease_deadlines(),
        k.workers(),
        k.commands_notify(),
        k.deployment("a/b"),
        k.deployments_status("active"),
        k.model_instances("a/b"),
        k.worker("w"),
        k.workers_status("ready"),
        k.worker_instances("w"),
        k.free_gpus("w"),
        k.address("1.2.3.4"),
        k.instance("i"),
        k.instances_status("ready"),
        k.commands("w"),
        k.commands_acked("w"),
        k.leader("r"),
        k.leader_token("r"),
        k.demand_reporters(),
        k.demand("d"),
        k.dispatchers(),
        k.dispatcher_endpoints(),
        k.ratelimit("b"),
        k.unplaceable(),
        k.lost_workers(),
        k.rate_replicas(),
        k.rate_share("c"),
        k.lineage(),
        k.recovering(),
    ];
    assert_eq!(lua, rust);
    let tag = format!("{{{}}}", &k.root()[1..k.root().len() - 2]);
    assert!(rust.iter().all(|key| key.starts_with(&tag)), "every key shares the hash tag {tag}");
}
