//! Random operations against the real scripts and, step by step, against a reference model of
//! the rules they implement: after every step the outcome (done, or which refusal) and the
//! whole state (deployments, workers, instances, free GPUs) must agree with the model, and the
//! store's own invariant check must pass. proptest shrinks a failing sequence to a short one.

use std::collections::{BTreeMap, BTreeSet};

use kvstore::worker::LostMode;
use kvstore::{
    Actor, DeploymentStatus, InstanceStatus, LeaderLease, Refusal, RunningInstance, Store,
    WorkerStatus,
};
use proptest::prelude::*;

use crate::*;

const MODELS: [&str; 2] = ["m0", "m1"];
const WORKERS: [&str; 2] = ["w0", "w1"];
const GPUS: u32 = 2;
const INSTANCES: usize = 5;

#[derive(Debug, Clone)]
enum Op {
    Deploy(usize),
    MarkDeleting(usize),
    Remove(usize),
    Place {
        i: usize,
        m: usize,
        w: usize,
        g: u32,
    },
    /// The worker `w` reports instance `i` in state `to`, with its current epoch.
    Report {
        i: usize,
        w: usize,
        to: InstanceStatus,
    },
    /// The leader moves instance `i`.
    Leader {
        i: usize,
        to: InstanceStatus,
    },
    Lost(usize),
    /// The worker registers again and reports running the instances of `keep` (indexes into
    /// its live instances, by id order) as ready.
    Rejoin {
        w: usize,
        keep: Vec<usize>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let m = 0..MODELS.len();
    let w = 0..WORKERS.len();
    let i = 0..INSTANCES;
    prop_oneof![
        1 => m.clone().prop_map(Op::Deploy),
        1 => m.clone().prop_map(Op::MarkDeleting),
        1 => m.clone().prop_map(Op::Remove),
        3 => (i.clone(), m, w.clone(), 0..GPUS).prop_map(|(i, m, w, g)| Op::Place { i, m, w, g }),
        3 => (i.clone(), w.clone(), prop_oneof![
            Just(InstanceStatus::Loading),
            Just(InstanceStatus::Ready),
            Just(InstanceStatus::Draining),
            Just(InstanceStatus::Stopped),
            Just(InstanceStatus::Failed),
        ])
            .prop_map(|(i, w, to)| Op::Report { i, w, to }),
        2 => (i, prop_oneof![
            Just(InstanceStatus::Draining),
            Just(InstanceStatus::Stopped),
            Just(InstanceStatus::Failed),
        ])
            .prop_map(|(i, to)| Op::Leader { i, to }),
        1 => w.clone().prop_map(Op::Lost),
        1 => (w, prop::collection::vec(0..4usize, 0..3)).prop_map(|(w, keep)| Op::Rejoin { w, keep }),
    ]
}

#[derive(Debug, Clone, PartialEq)]
struct Inst {
    model: String,
    worker: String,
    status: InstanceStatus,
    gpu: u32,
}

#[derive(Debug, Clone, PartialEq)]
struct Wkr {
    epoch: u64,
    status: WorkerStatus,
}

/// The rules, as plain Rust.
#[derive(Debug, Default)]
struct Model {
    deployments: BTreeMap<String, DeploymentStatus>,
    workers: BTreeMap<String, Wkr>,
    instances: BTreeMap<String, Inst>,
}

type Outcome = Result<(), String>;

fn refused(r: Refusal) -> Outcome {
    let name = format!("{r:?}");
    Err(name.split([' ', '{', '(']).next().unwrap_or_default().to_string())
}

fn live(s: InstanceStatus) -> bool {
    !s.is_terminal()
}

impl Model {
    fn free_gpus(&self, w: &str) -> BTreeSet<u32> {
        let used: BTreeSet<u32> = self
            .instances
            .values()
            .filter(|i| i.worker == w && live(i.status))
            .map(|i| i.gpu)
            .collect();
        (0..GPUS).filter(|g| !used.contains(g)).collect()
    }

    fn live_on(&self, w: &str) -> Vec<String> {
        self.instances
            .iter()
            .filter(|(_, i)| i.worker == w && live(i.status))
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn apply(&mut self, op: &Op) -> Outcome {
        use InstanceStatus as S;
        match op {
            Op::Deploy(m) => {
                if self.deployments.contains_key(MODELS[*m]) {
                    return refused(Refusal::AlreadyExists);
                }
                self.deployments.insert(MODELS[*m].into(), DeploymentStatus::Active);
            }
            Op::MarkDeleting(m) => match self.deployments.get_mut(MODELS[*m]) {
                None => return refused(Refusal::NotFound),
                Some(s) if *s != DeploymentStatus::Active => {
                    return refused(Refusal::WrongState { current: String::new() });
                }
                Some(s) => *s = DeploymentStatus::Deleting,
            },
            Op::Remove(m) => {
                let name = MODELS[*m];
                match self.deployments.get(name) {
                    None => return refused(Refusal::NotFound),
                    Some(DeploymentStatus::Active) => {
                        return refused(Refusal::WrongState { current: String::new() });
                    }
                    Some(_) => {}
                }
                let n = self.instances.values().filter(|i| i.model == name && live(i.status));
                if n.count() > 0 {
                    return refused(Refusal::HasInstances { count: 0 });
                }
                self.deployments.remove(name);
            }
            Op::Place { i, m, w, g } => {
                let (id, model, worker) = (format!("i{i}"), MODELS[*m], WORKERS[*w]);
                match self.deployments.get(model) {
                    None => return refused(Refusal::NotFound),
                    Some(DeploymentStatus::Deleting) => {
                        return refused(Refusal::WrongState { current: String::new() });
                    }
                    Some(_) => {}
                }
                if self.workers[worker].status != WorkerStatus::Ready {
                    return refused(Refusal::WorkerNotReady { state: String::new() });
                }
                if self.instances.contains_key(&id) {
                    return refused(Refusal::AlreadyExists);
                }
                if !self.free_gpus(worker).contains(g) {
                    return refused(Refusal::GpuBusy { gpu: 0 });
                }
                let inst = Inst {
                    model: model.into(),
                    worker: worker.into(),
                    status: S::Pending,
                    gpu: *g,
                };
                self.instances.insert(id, inst);
            }
            Op::Report { i, w, to } => {
                if *to == S::Draining {
                    return refused(Refusal::NotAllowed);
                }
                let worker = WORKERS[*w];
                let Some(inst) = self.instances.get(&format!("i{i}")) else {
                    return refused(Refusal::NotFound);
                };
                if inst.worker != worker {
                    return refused(Refusal::WrongWorker { owner: String::new() });
                }
                if self.workers[worker].status == WorkerStatus::Lost {
                    return refused(Refusal::WorkerLost);
                }
                return self.move_instance(*i, *to);
            }
            Op::Leader { i, to } => {
                if !self.instances.contains_key(&format!("i{i}")) {
                    return refused(Refusal::NotFound);
                }
                return self.move_instance(*i, *to);
            }
            Op::Lost(w) => {
                let worker = WORKERS[*w];
                let wk = self.workers.get_mut(worker).expect("known worker");
                if wk.status == WorkerStatus::Lost {
                    return refused(Refusal::WrongState { current: String::new() });
                }
                wk.status = WorkerStatus::Lost;
                for inst in self.instances.values_mut() {
                    if inst.worker == worker && live(inst.status) {
                        inst.status = S::Lost;
                    }
                }
            }
            Op::Rejoin { w, keep } => {
                let worker = WORKERS[*w];
                let on = self.live_on(worker);
                let kept: BTreeSet<String> =
                    keep.iter().filter_map(|k| on.get(*k).cloned()).collect();
                let wk = self.workers.get_mut(worker).expect("known worker");
                wk.epoch += 1;
                wk.status = WorkerStatus::Ready;
                for (id, inst) in self.instances.iter_mut() {
                    if inst.worker != worker || !live(inst.status) {
                        continue;
                    }
                    if kept.contains(id) {
                        inst.status = S::Ready;
                    } else if inst.status != S::Pending {
                        inst.status = S::Stopped;
                    }
                }
            }
        }
        Ok(())
    }

    fn move_instance(&mut self, i: usize, to: InstanceStatus) -> Outcome {
        use InstanceStatus as S;
        let inst = self.instances.get_mut(&format!("i{i}")).expect("checked");
        if inst.status == to {
            return Ok(()); // noop
        }
        let from_ok = match to {
            S::Loading => inst.status == S::Pending,
            S::Ready => matches!(inst.status, S::Pending | S::Loading),
            S::Draining => matches!(inst.status, S::Pending | S::Loading | S::Ready),
            S::Stopped | S::Failed => live(inst.status),
            _ => false,
        };
        if !from_ok {
            return refused(Refusal::WrongState { current: String::new() });
        }
        inst.status = to;
        Ok(())
    }
}

async fn run_op(store: &Store, lease: &LeaderLease, model: &Model, op: &Op) -> Outcome {
    let epoch = |w: &str| model.workers[w].epoch;
    let result: kvstore::Result<()> = match op {
        Op::Deploy(m) => store.create_deployment(&spec(MODELS[*m])).await.map(|_| ()),
        Op::MarkDeleting(m) => store.mark_deployment_deleting(MODELS[*m]).await.map(|_| ()),
        Op::Remove(m) => store.remove_deployment(MODELS[*m]).await,
        Op::Place { i, m, w, g } => store
            .create_instance(lease, &placement(&format!("i{i}"), MODELS[*m], WORKERS[*w], &[*g]))
            .await
            .map(|_| ()),
        Op::Report { i, w, to } => {
            let me = Actor::Worker { worker_id: WORKERS[*w], epoch: epoch(WORKERS[*w]) };
            store.transition_instance(&format!("i{i}"), *to, me, "", None).await.map(|_| ())
        }
        Op::Leader { i, to } => store
            .transition_instance(&format!("i{i}"), *to, Actor::Leader(lease), "", None)
            .await
            .map(|_| ()),
        Op::Lost(w) => {
            let w = WORKERS[*w];
            store.worker_lost(w, epoch(w), LostMode::Dropped, "test").await.map(|_| ())
        }
        Op::Rejoin { w, keep } => {
            let worker = WORKERS[*w];
            let on = model.live_on(worker);
            let running: Vec<RunningInstance> = keep
                .iter()
                .filter_map(|k| on.get(*k))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .map(|id| RunningInstance {
                    instance_id: id.clone(),
                    model: model.instances[id].model.clone(),
                    status: InstanceStatus::Ready,
                    gpus: vec![model.instances[id].gpu],
                })
                .collect();
            let address = format!("10.0.0.{w}");
            match store.register_worker(worker, true, &address, LEASE, &inventory(GPUS), "t").await
            {
                Ok(reg) => store.worker_ready(worker, reg.epoch, &running).await.map(|_| ()),
                Err(e) => Err(e),
            }
        }
    };
    match result {
        Ok(()) => Ok(()),
        Err(e) => match e.refusal() {
            Some(r) => refused(r.clone()),
            None => Err(format!("not a refusal: {e}")),
        },
    }
}

async fn assert_same(store: &Store, model: &Model, step: usize, op: &Op) {
    let deployments: BTreeMap<String, DeploymentStatus> = store
        .list_deployments()
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.spec.model, d.status))
        .collect();
    assert_eq!(deployments, model.deployments, "deployments after step {step} {op:?}");
    for (id, want) in &model.workers {
        let got = store.get_worker(id).await.unwrap().unwrap();
        let got_free: BTreeSet<u32> = got.free_gpus.iter().copied().collect();
        assert_eq!(
            (got.epoch, got.status, got_free),
            (want.epoch, want.status, model.free_gpus(id)),
            "worker {id} after step {step} {op:?}"
        );
    }
    for i in 0..INSTANCES {
        let id = format!("i{i}");
        let got = store.get_instance(&id).await.unwrap().map(|r| Inst {
            model: r.model,
            worker: r.worker_id,
            status: r.status,
            gpu: r.gpus.first().copied().unwrap_or(u32::MAX),
        });
        assert_eq!(
            got.as_ref(),
            model.instances.get(&id),
            "instance {id} after step {step} {op:?}"
        );
    }
    assert_consistent(store).await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_agree_with_the_reference_model(ops in prop::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (_redis, store) = setup().await;
            let lease = lead(&store, "s").await;
            let mut model = Model::default();
            for w in WORKERS {
                let epoch = ready_worker(&store, w, GPUS).await;
                model.workers.insert(w.into(), Wkr { epoch, status: WorkerStatus::Ready });
            }
            for (step, op) in ops.iter().enumerate() {
                let got = run_op(&store, &lease, &model, op).await;
                let want = model.apply(op);
                assert_eq!(got, want, "outcome of step {step} {op:?}");
                assert_same(&store, &model, step, op).await;
            }
        });
    }
}
