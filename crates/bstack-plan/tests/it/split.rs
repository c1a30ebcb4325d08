//! `CachePlan::for_node`: a cluster-wide plan split into the shares each
//! node's store executes.

use bstack_plan::{CachePlan, KvPageRef, Validate, example};

/// The example plan (all on node0) with a second node's copies and pages
/// added, and one operation into device memory, which no node's store owns.
fn two_node_plan() -> CachePlan {
    let mut plan = example::cache_plan();
    let node0_ops = plan.ops.clone();
    for op in &node0_ops {
        let mut other = op.clone();
        other.src = other.src.replace("node0", "node1");
        other.dst = other.dst.replace("node0", "node1");
        plan.ops.push(other);
    }
    let mut device = node0_ops[0].clone();
    device.dst = "device://gpu0/kv".into();
    plan.ops.push(device);
    // A remote fetch: node1 reads node0's CPU copy; node1 executes it.
    let mut remote = node0_ops[2].clone();
    remote.dst = "tier://node1/cpu".into();
    remote.src = "tier://node0/cpu".into();
    remote.dst_offset += remote.length;
    plan.ops.push(remote);
    let moved = |refs: &[KvPageRef]| -> Vec<KvPageRef> {
        refs.iter()
            .map(|r| KvPageRef {
                location: r.location.replace("node0", "node1"),
                ..r.clone()
            })
            .collect()
    };
    plan.evict.extend(moved(&plan.evict.clone()));
    plan.admit.extend(moved(&plan.admit.clone()));
    plan.prefetch.extend(moved(&plan.prefetch.clone()));
    plan
}

#[test]
fn shares_partition_the_tier_operations_and_pages() {
    let plan = two_node_plan();
    assert!(plan.problems().is_empty(), "{:?}", plan.problems());
    let a = plan.for_node("node0");
    let b = plan.for_node("node1");
    let example = example::cache_plan();
    assert_eq!(a.ops, example.ops, "node0 keeps exactly its own copies");
    assert_eq!(
        b.ops.len(),
        example.ops.len() + 1,
        "node1 also runs the remote fetch"
    );
    assert!(b.ops.iter().all(|o| o.dst.starts_with("tier://node1/")));
    // Every operation into a tier is in exactly one share; the device copy
    // is in none.
    assert_eq!(a.ops.len() + b.ops.len(), plan.ops.len() - 1);
    for (share, node) in [(&a, "node0"), (&b, "node1")] {
        for refs in [&share.evict, &share.admit, &share.prefetch] {
            assert!(
                refs.iter()
                    .all(|r| r.location.starts_with(&format!("tier://{node}/")))
            );
        }
        assert_eq!(share.plan_id, format!("{}@{node}", plan.plan_id));
        assert_eq!(share.window, plan.window);
        assert!(
            share.problems().is_empty(),
            "{node}: {:?}",
            share.problems()
        );
    }
    assert_eq!(a.evict.len() + b.evict.len(), plan.evict.len());
    assert_eq!(a.admit.len() + b.admit.len(), plan.admit.len());
    assert_eq!(a.prefetch.len() + b.prefetch.len(), plan.prefetch.len());
}

#[test]
fn an_unknown_node_gets_an_empty_share() {
    let share = two_node_plan().for_node("node7");
    assert!(share.ops.is_empty() && share.evict.is_empty());
    assert!(share.admit.is_empty() && share.prefetch.is_empty());
    assert!(share.problems().is_empty());
}
